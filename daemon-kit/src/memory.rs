//! The guest memory the frontend shared (VHOST_USER_SET_MEM_TABLE), as the workers read
//! it. Regions reach here only after [`crate::checks`] found each inside its file.

use crate::Mem;
use std::sync::RwLock;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

pub struct Memory(RwLock<Mem>);

impl Default for Memory {
    fn default() -> Self {
        Self(RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())))
    }
}

impl Memory {
    /// `VhostUserBackend::update_memory`.
    pub fn update(&self, mem: Mem) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = mem;
    }

    /// A snapshot of the current memory map, valid while the guard lives.
    pub fn get(&self) -> GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).memory()
    }
}
