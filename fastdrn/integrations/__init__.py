"""Optional glue to other frameworks; each module imports its framework only when imported itself."""
