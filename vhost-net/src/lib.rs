//! vhost-user user-mode network daemon: not implemented yet.
