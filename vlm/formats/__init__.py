"""On-disk formats: one module per file type, each with its reader and writer."""
