//! Guest physical address layout (x86_64).

/// Global descriptor table for the 64-bit boot.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty: the boot code takes no interrupts).
pub const IDT_START: u64 = 0x520;
/// Linux boot parameters ("zero page"), passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT, four page directories (4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// PVH start_info and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// End of the low RAM area the e820 map reports (EBDA above it).
pub const EBDA_START: u64 = 0x9fc00;
/// Where 64-bit kernels are loaded.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The MMIO gap below 4 GiB: guest RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio transports, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First interrupt line of the virtio-mmio devices (COM1 uses 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// TSS and identity-map pages KVM needs on Intel, inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
