//! `start_info` (`public/xen.h`, x86_64 layout): what the domain builder tells the guest.
//!
//! Read once, field by field with volatile loads, into a private copy; nothing keeps a
//! reference into the page.
//!
//! ```text
//!  off  size  field
//!    0    32  magic "xen-<version>-x86_64"
//!   32     8  nr_pages
//!   40     8  shared_info (machine address)
//!   48     4  flags
//!   56     8  store_mfn
//!   64     4  store_evtchn
//!   72     8  console.domU.mfn
//!   80     4  console.domU.evtchn
//!   88     8  pt_base (virtual)
//!   96     8  nr_pt_frames
//!  104     8  mfn_list (virtual address of the p2m array, nr_pages x u64)
//!  112     8  mod_start
//!  120     8  mod_len
//!  128  1024  cmd_line (NUL-terminated)
//! ```

/// The fields of `start_info` the guest uses.
#[derive(Debug, Clone, Copy)]
pub struct StartInfo {
    /// Where the structure itself is (virtual address, as `_start` received it).
    pub addr: u64,
    /// `magic`, NUL-padded.
    pub magic: [u8; 32],
    /// Pages this domain owns.
    pub nr_pages: u64,
    /// Machine address of the shared-info page.
    pub shared_info: u64,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Where the boot module is: a virtual address, or a pfn if `flags` has
    /// `SIF_MOD_START_PFN`.
    pub mod_start: u64,
    /// Length of the boot module (0: none).
    pub mod_len: u64,
    /// Machine frame of the xenstore page (none is set up for the agent's domains).
    pub store_mfn: u64,
    /// Virtual address of the boot page tables' top level (L4).
    pub pt_base: u64,
    /// Number of boot page-table frames, from `pt_base` on.
    pub nr_pt_frames: u64,
    /// Machine frame of the console ring page.
    pub console_mfn: u64,
    /// Event channel of the console.
    pub console_evtchn: u32,
    /// Virtual address of the p2m array (`nr_pages` machine frame numbers).
    pub mfn_list: u64,
    /// The command line, NUL-terminated.
    pub cmd_line: [u8; 1024],
}

fn read<T: Copy>(base: usize, offset: usize) -> T {
    // SAFETY: `base` is the start_info page Xen mapped for us (checked non-null by the
    // caller) and every offset used lies inside the 1168-byte structure.
    unsafe { core::ptr::read_volatile((base + offset) as *const T) }
}

impl StartInfo {
    /// Copies the structure at `addr` (as `_start` received it in `%rsi`).
    pub fn read(addr: usize) -> Self {
        let mut magic = [0u8; 32];
        for (i, b) in magic.iter_mut().enumerate() {
            *b = read(addr, i);
        }
        let mut cmd_line = [0u8; 1024];
        for (i, b) in cmd_line.iter_mut().enumerate() {
            *b = read(addr, 128 + i);
        }
        Self {
            addr: addr as u64,
            magic,
            nr_pages: read(addr, 32),
            shared_info: read(addr, 40),
            flags: read(addr, 48),
            mod_start: read(addr, 112),
            mod_len: read(addr, 120),
            store_mfn: read(addr, 56),
            pt_base: read(addr, 88),
            nr_pt_frames: read(addr, 96),
            console_mfn: read(addr, 72),
            console_evtchn: read(addr, 80),
            mfn_list: read(addr, 104),
            cmd_line,
        }
    }

    /// The magic up to its NUL.
    pub fn magic_str(&self) -> &str {
        until_nul(&self.magic)
    }

    /// The command line up to its NUL.
    pub fn cmd_line_str(&self) -> &str {
        until_nul(&self.cmd_line)
    }

    /// The virtual address of the boot module (`SIF_MOD_START_PFN`: `mod_start` is a pfn,
    /// and with virtual base 0 its address is `pfn * 4096`).
    pub fn module_va(&self) -> u64 {
        const SIF_MOD_START_PFN: u32 = 1 << 3;
        if self.flags & SIF_MOD_START_PFN != 0 {
            self.mod_start.saturating_mul(4096)
        } else {
            self.mod_start
        }
    }

    /// The machine frame of pseudo-physical frame `pfn` (its p2m entry; `pfn < nr_pages`,
    /// else `u64::MAX`, which matches no frame).
    pub fn mfn_of(&self, pfn: u64) -> u64 {
        if pfn >= self.nr_pages {
            return u64::MAX;
        }
        let entry = (self.mfn_list + pfn * 8) as *const u64;
        // SAFETY: the builder maps the p2m array, nr_pages entries, at mfn_list; pfn is
        // below nr_pages.
        unsafe { core::ptr::read_volatile(entry) }
    }

    /// The pseudo-physical frame holding machine frame `mfn` (a search of the p2m array).
    pub fn pfn_of(&self, mfn: u64) -> Option<u64> {
        (0..self.nr_pages).find(|&pfn| {
            let entry = (self.mfn_list + pfn * 8) as *const u64;
            // SAFETY: the builder maps the p2m array, nr_pages entries, at mfn_list.
            unsafe { core::ptr::read_volatile(entry) == mfn }
        })
    }
}

fn until_nul(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).unwrap_or("<not UTF-8>")
}
