//! Loading a kernel, initrd and command line, and writing what the kernel reads at
//! entry: Linux boot parameters (64-bit boot protocol) or a PVH start_info.

use crate::layout::*;
use crate::memory::ram_ranges;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{linux::LinuxBootConfigurator, BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{self, Elf, PvhBootCapability};
use linux_loader::loader::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{self, load_cmdline, KernelLoader};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point from where a bzImage's protected-mode code loads.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is neither an ELF vmlinux nor a bzImage: {source}")]
    Load {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("initrd {path}: {source}")]
    Initrd { path: PathBuf, source: io::Error },
    #[error("initrd of {size} bytes does not fit below the kernel's limit")]
    InitrdTooLarge { size: u64 },
    #[error("writing boot information into guest memory: {0}")]
    Write(String),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, EBX = start_info.
    Pvh(GuestAddress),
    /// Linux 64-bit boot protocol: long mode, identity-mapped, RSI = boot params.
    Linux64(GuestAddress),
}

#[derive(Debug)]
pub struct Kernel {
    pub entry: Entry,
    pub end: u64,
    /// A bzImage's setup header, copied into the boot parameters.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    /// Whether the image identifies itself as Linux (a PVH note or a bzImage header).
    pub is_linux: bool,
}

impl Kernel {
    /// What the kernel command line gains for this kind of image. This VM has no PCI
    /// bus, and a bzImage is a distribution kernel built with PCI: `pci=off` spares it
    /// scanning for one (65536 config-space reads by port I/O, each an exit to the VMM;
    /// 35 s of a Debian kernel's 42 s boot in the nested rig). An ELF vmlinux gets
    /// nothing: the project kernel has no PCI and would hand an unknown `pci=off` to
    /// init as an environment variable.
    pub fn cmdline_extra(&self) -> &'static str {
        if self.setup_header.is_some() {
            " pci=off"
        } else {
            ""
        }
    }
}

/// Loads an ELF vmlinux (PVH entry when its note exists) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Kernel, Error> {
    let open = || {
        File::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })
    };
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    match Elf::load(mem, None, &mut open()?, high) {
        Ok(result) => {
            let (entry, is_linux) = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (Entry::Pvh(addr), true),
                _ => (Entry::Linux64(result.kernel_load), false),
            };
            Ok(Kernel {
                entry,
                end: result.kernel_end,
                setup_header: None,
                is_linux,
            })
        }
        Err(loader::Error::Elf(elf::Error::InvalidElfMagicNumber)) => {
            let result =
                BzImage::load(mem, None, &mut open()?, high).map_err(|source| Error::Load {
                    path: path.to_owned(),
                    source,
                })?;
            Ok(Kernel {
                entry: Entry::Linux64(result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET)),
                end: result.kernel_end,
                setup_header: result.setup_header,
                is_linux: true,
            })
        }
        Err(source) => Err(Error::Load {
            path: path.to_owned(),
            source,
        }),
    }
}

/// An initrd loaded at the top of low memory, page aligned.
#[derive(Debug, Clone, Copy)]
pub struct Initrd {
    pub addr: GuestAddress,
    pub size: u64,
}

pub fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64) -> Result<Initrd, Error> {
    let err = |source| Error::Initrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    let low_end = ram_ranges(mem.last_addr().0 + 1)[0].1.min(MMIO_GAP_START);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(Error::InitrdTooLarge { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Write(e.to_string()))?;
    Ok(Initrd {
        addr: GuestAddress(addr),
        size,
    })
}

pub fn cmdline(text: &str) -> Result<Cmdline, Error> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(text)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    Ok(cmdline)
}

/// The e820 / PVH memory map: low RAM, reserved EBDA to 1 MiB, RAM above.
fn memory_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ];
    for (addr, len) in ram_ranges(mem_size) {
        let start = addr.0.max(HIGH_MEMORY_START);
        map.push((start, addr.0 + len - start, E820_RAM));
    }
    map
}

/// Writes the command line and the boot information the entry point expects.
pub fn configure(
    mem: &GuestMemoryMmap,
    kernel: &Kernel,
    cmdline: &Cmdline,
    initrd: Option<Initrd>,
) -> Result<(), Error> {
    let write_err = |e: linux_loader::configurator::Error| Error::Write(e.to_string());
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| Error::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    let mem_size = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    let map = memory_map(mem_size);

    match kernel.entry {
        Entry::Pvh(_) => {
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            let mut modules = Vec::new();
            if let Some(initrd) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MEMMAP_START + 0x400;
                modules.push(linux_loader::loader::start_info::hvm_modlist_entry {
                    paddr: initrd.addr.0,
                    size: initrd.size,
                    ..Default::default()
                });
            }
            let entries: Vec<hvm_memmap_table_entry> = map
                .iter()
                .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_,
                    reserved: 0,
                })
                .collect();
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            params.set_sections(&entries, GuestAddress(PVH_MEMMAP_START));
            if !modules.is_empty() {
                params.set_modules(&modules, GuestAddress(PVH_MEMMAP_START + 0x400));
            }
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(write_err)
        }
        Entry::Linux64(_) => {
            let mut params = boot_params::default();
            if let Some(header) = kernel.setup_header {
                params.hdr = header;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_len as u32;
            if let Some(initrd) = initrd {
                params.hdr.ramdisk_image = initrd.addr.0 as u32;
                params.hdr.ramdisk_size = initrd.size as u32;
            }
            for (i, &(addr, size, type_)) in map.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry {
                    addr,
                    size,
                    r#type: type_,
                };
            }
            params.e820_entries = map.len() as u8;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(write_err)
        }
    }
}

/// Identity-maps the first 4 GiB with 2 MiB pages (PML4 → one PDPT → four PDs), so the
/// 64-bit entry can reach RAM and the virtio-mmio windows alike.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let w = |value: u64, at: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(|e| Error::Write(e.to_string()))
    };
    w(PDPTE_START | 0x03, PML4_START)?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        w(pd | 0x03, PDPTE_START + gib * 8)?;
        for i in 0..512u64 {
            // present | writable | 2 MiB page
            w(((gib << 30) + (i << 21)) | 0x83, pd + i * 8)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reserves_the_ebda_and_skips_the_mmio_gap() {
        let map = memory_map(4 << 30);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(
            map[2],
            (
                HIGH_MEMORY_START,
                MMIO_GAP_START - HIGH_MEMORY_START,
                E820_RAM
            )
        );
        assert_eq!(map[3], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START, E820_RAM));
    }

    #[test]
    fn a_file_that_is_no_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let mem = crate::memory::create(32).unwrap();
        assert!(matches!(load_kernel(&mem, &path), Err(Error::Load { .. })));
    }
}
