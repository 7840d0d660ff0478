//! Config errors with file, line and column.
