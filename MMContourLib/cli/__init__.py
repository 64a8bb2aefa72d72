"""The mmcontour command: one module per subcommand; argparse lives only here."""
