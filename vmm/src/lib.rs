//! KVM microVM core (issue 3): not implemented yet.
