"""Image files, the CT-series reader, grids, preprocessing to the model grid and back, metrics."""
