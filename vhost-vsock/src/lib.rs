//! vhost-user vsock daemon (issue 5): not implemented yet.
