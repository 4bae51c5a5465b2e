//! Loading a kernel (ELF vmlinux or bzImage), its initrd and command line
//! into guest memory, with the zero page, MP table, GDT and page tables the
//! Linux 64-bit boot protocol expects.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use api_types::size::format_bytes;
use arch::MemoryLayout;
use arch::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, GDT_ADDR, HIMEM_START, IDT_ADDR, ZERO_PAGE_ADDR,
};
use devices::GuestMemory;
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Bytes, GuestAddress};

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage: {reason}")]
    LoadKernel { path: PathBuf, reason: String },
    #[error(
        "kernel {path} does not fit in guest RAM: it loads at {start:#x}..{end:#x}, which needs \
         --memory of at least {}; --memory is {}",
        format_bytes(end.next_multiple_of(1 << 20)),
        format_bytes(*memory)
    )]
    KernelTooBig {
        path: PathBuf,
        start: u64,
        end: u64,
        memory: u64,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path}: {source}")]
    PlaceInitrd {
        path: PathBuf,
        #[source]
        source: arch::boot_params::BootParamsError,
    },
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a non-printable character at byte {0}")]
    CmdlineInvalid(usize),
    #[error(transparent)]
    BootParams(#[from] arch::boot_params::BootParamsError),
    #[error(transparent)]
    MpTable(#[from] arch::mptable::MpTableError),
    #[error("writing boot structures into guest memory at {addr:#x}: {reason}")]
    GuestWrite { addr: u64, reason: String },
}

/// Where execution starts.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub entry: u64,
    pub kernel_end: u64,
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemory, val: T, addr: u64) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            addr,
            reason: e.to_string(),
        })
}

fn write_bytes(mem: &GuestMemory, bytes: &[u8], addr: u64) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            addr,
            reason: e.to_string(),
        })
}

/// Check a command line: printable ASCII, within the size limit (with its NUL).
pub fn validate_cmdline(cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if let Some(i) = cmdline.bytes().position(|b| !(0x20..0x7f).contains(&b)) {
        return Err(BootError::CmdlineInvalid(i));
    }
    Ok(())
}

/// The guest-physical range `[start, end)` the loader will write the
/// kernel to, from its headers: an ELF64's PT_LOAD segments (at their
/// physical addresses), a bzImage's protected-mode part (at its
/// `code32_start`). `None` when the headers do not say (the loader then
/// reports what is wrong).
fn load_range(f: &mut File, magic: &[u8; 4]) -> Option<(u64, u64)> {
    let mut read_at = |offset: u64, len: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0; len];
        f.seek(SeekFrom::Start(offset)).ok()?;
        f.read_exact(&mut buf).ok()?;
        Some(buf)
    };
    let u16_at =
        |b: &[u8], at: usize| Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?));
    let u64_at =
        |b: &[u8], at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    if magic != b"\x7fELF" {
        // Only a bzImage's setup header says where it goes.
        if read_at(0x202, 4)? != b"HdrS" {
            return None;
        }
        let setup_sects = match read_at(0x1f1, 1)?[0] {
            0 => 4,
            n => u64::from(n),
        };
        let code32_start = u64::from(u32::from_le_bytes(read_at(0x214, 4)?.try_into().ok()?));
        let len = f.metadata().ok()?.len();
        let size = len.checked_sub((setup_sects + 1) * 512)?;
        return Some((code32_start, code32_start.checked_add(size)?));
    }
    // ELF64, little-endian (what the loader takes).
    let eh = read_at(0, 64)?;
    if eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(&eh, 0x20)?, u16_at(&eh, 0x36)?, u16_at(&eh, 0x38)?);
    // An ELF64 program header is 56 bytes; a bigger claimed size (up to
    // 64 KiB each, 64 Ki of them) would only make the table to read huge.
    if !(56..=64).contains(&phentsize) {
        return None;
    }
    let table = read_at(phoff, usize::from(phentsize) * usize::from(phnum))?;
    let mut range: Option<(u64, u64)> = None;
    for ph in table.chunks_exact(usize::from(phentsize)) {
        const PT_LOAD: u32 = 1;
        if u32::from_le_bytes(ph[..4].try_into().ok()?) != PT_LOAD {
            continue;
        }
        let (paddr, memsz) = (u64_at(ph, 24)?, u64_at(ph, 40)?);
        let end = paddr.checked_add(memsz)?;
        range = Some(range.map_or((paddr, end), |(s, e)| (s.min(paddr), e.max(end))));
    }
    range.filter(|(s, e)| e > s)
}

/// Load everything and return the entry point.
pub fn load(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
) -> Result<BootInfo, BootError> {
    validate_cmdline(cmdline)?;
    let mut f = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let load_err = |reason: String| BootError::LoadKernel {
        path: kernel.to_path_buf(),
        reason,
    };
    f.read_exact(&mut magic)
        .map_err(|e| load_err(format!("cannot read its first 4 bytes: {e}")))?;
    // Said here: the loaders report a kernel beyond RAM as unreadable.
    if let Some((start, end)) = load_range(&mut f, &magic)
        && !layout.contains(start, end - start)
    {
        return Err(BootError::KernelTooBig {
            path: kernel.to_path_buf(),
            start,
            end,
            memory: layout.size(),
        });
    }
    f.seek(SeekFrom::Start(0))
        .map_err(|e| load_err(e.to_string()))?;
    let (entry, kernel_end, setup_header) = if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| load_err(format!("ELF: {e}")))?;
        (r.kernel_load.0, r.kernel_end, None)
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| load_err(format!("bzImage: {e}")))?;
        // The 64-bit entry point is 0x200 past the protected-mode kernel's start.
        (r.kernel_load.0 + 0x200, r.kernel_end, r.setup_header)
    };

    let initrd_place = match initrd {
        None => None,
        Some(path) => {
            let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
                path: path.to_path_buf(),
                source,
            })?;
            let addr = arch::boot_params::initrd_address(layout, kernel_end, data.len() as u64)
                .map_err(|source| BootError::PlaceInitrd {
                    path: path.to_path_buf(),
                    source,
                })?;
            write_bytes(mem, &data, addr)?;
            Some((addr, data.len() as u64))
        }
    };

    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    write_bytes(mem, &bytes, CMDLINE_ADDR)?;

    let bp = arch::boot_params::build(
        layout,
        &arch::boot_params::BootParamsConfig {
            cmdline_addr: CMDLINE_ADDR,
            cmdline_size: bytes.len() as u32,
            initrd: initrd_place,
            setup_header,
        },
    )?;
    write(mem, bp, ZERO_PAGE_ADDR)?;

    let mp = arch::mptable::build(u32::from(vcpus))?;
    write_bytes(mem, &mp.bytes, mp.address)?;

    for (i, e) in arch::gdt::BOOT_GDT.iter().enumerate() {
        write(mem, *e, GDT_ADDR + i as u64 * 8)?;
    }
    write(mem, 0u64, IDT_ADDR)?;
    for page in arch::paging::identity_map_first_gib() {
        for (i, e) in page.entries.iter().enumerate() {
            write(mem, *e, page.addr + i as u64 * 8)?;
        }
    }
    Ok(BootInfo { entry, kernel_end })
}

/// What [`load`] will find in `kernel`, read from its header alone: an
/// ELF vmlinux or a bzImage (the "HdrS" signature at 0x202). For refusing
/// a wrong file before anything else is set up (guest RAM in a file,
/// say); `load` checks everything again.
pub fn check_kernel_header(kernel: &Path) -> Result<(), BootError> {
    let load_err = |reason: String| BootError::LoadKernel {
        path: kernel.to_path_buf(),
        reason,
    };
    let mut f = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let mut head = [0u8; 0x206];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(load_err(format!("cannot read its header: {e}"))),
        }
    }
    if head[..got].starts_with(b"\x7fELF") || (got == head.len() && &head[0x202..] == b"HdrS") {
        Ok(())
    } else {
        Err(load_err(format!(
            "no ELF magic and no bzImage header signature (HdrS at 0x202) in its first {got} bytes"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_checks() {
        validate_cmdline("console=ttyS0 testguest.run=\"fill 1 2;exit 0\"").unwrap();
        assert!(matches!(
            validate_cmdline("a\nb"),
            Err(BootError::CmdlineInvalid(1))
        ));
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            validate_cmdline(&long),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    /// A bzImage goes at its code32_start, without its setup sectors; a
    /// file without the setup header's magic has no range (the loader
    /// says what it is not).
    #[test]
    fn bzimage_load_range() {
        let path = std::env::temp_dir().join(format!("blimp-bzimage-{}", std::process::id()));
        let mut image = vec![0u8; 8192];
        image[0x1f1] = 3;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        std::fs::write(&path, &image).unwrap();
        let range = load_range(&mut File::open(&path).unwrap(), b"MZ\0\0");
        image[0x202] = b'X';
        std::fs::write(&path, &image).unwrap();
        let none = load_range(&mut File::open(&path).unwrap(), b"MZ\0\0");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(range, Some((0x10_0000, 0x10_0000 + 8192 - 4 * 512)));
        assert_eq!(none, None);
    }
}
