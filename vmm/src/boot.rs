//! Loading a kernel (ELF vmlinux or bzImage), its initrd and command line
//! into guest memory, with the zero page, MP table, GDT and page tables the
//! Linux 64-bit boot protocol expects.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

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
}
