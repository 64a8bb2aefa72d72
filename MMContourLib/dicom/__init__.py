"""DICOM RT: RTSTRUCT and DICOM SEG export, planning-archive import."""
