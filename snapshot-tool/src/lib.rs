//! snapshot inspection and verification tool: not implemented yet.
