//! bf16 matrix products on Intel AMX tiles: what `--bf16` (autocast) runs on a CPU
//! with `amx_bf16`, where PyTorch's CPU autocast runs its matmuls through oneDNN's AMX
//! kernels.
//!
//! C (m × n) = [C +] A (m × k) · B (k × n): both operands are rounded to bf16 (nearest
//! even) into packed copies and `tdpbf16ps` sums the products in f32 (bf16 denormals
//! count as zero there). Closer to f32 than PyTorch's or the GPU path's autocast:
//! - C stays f32 (theirs is rounded to bf16);
//! - only the products that go through `ops::gemm` change, all of them whatever their
//!   size (a row's result does not depend on how many rows share the call): the
//!   dense layers (forward, dx, dW) and the LM head; attention's scores and weighted
//!   sums, the norms and everything else stay f32, and so does the skinny kernel
//!   (dense layers of 16 rows or fewer, and every product of `rlhf generate` and
//!   `rlhf serve`, which `--bf16` therefore leaves f32).
//!
//! The master weights, the gradients' accumulation and the optimizer stay f32.
//! Neither the gemm crate nor candle has a bf16 CPU kernel, and Rust's AMX
//! intrinsics are unstable, so the tile instructions are inline assembly here.
//!
//! Layout (every dimension padded with zeros: m and n to multiples of 32, k to 32):
//! each tile (16 rows of 64 bytes) is stored whole, so a tile load reads 1 KiB in a
//! row (rows of a packed matrix 4 KiB apart would all fall in one L1 set).
//! - A in groups of 16 rows, each group its tiles along k one after another.
//! - B in groups of 16 columns, in the pair-interleaved ("VNNI") form `tdpbf16ps`
//!   reads: tile row r holds, for each of its columns j, B[2r][j] then B[2r + 1][j].
//! - Each task computes 32 × 32 blocks of C in four accumulator tiles (tmm0–3) from two
//!   A tiles (tmm4–5) and two B tiles (tmm6–7) per 32 steps of k. A block's sums do
//!   not depend on the threads, so results are the same from run to run.
//!
//! The switch is process-wide (`set_autocast`, through `device::set_default`): a test
//! that turns it on must be alone in its test binary (`tests/bf16.rs`), or the other
//! tests' products would change under them.

use rayon::prelude::*;

use super::simd::simd_kernel;

/// Rows and columns of C per block (two tiles each way).
const BLOCK: usize = 32;
/// k per tile step: 32 bf16 = one 64-byte tile row.
const K_STEP: usize = 32;

/// `x` rounded to the nearest bf16 (ties to even); NaN stays NaN.
#[inline(always)]
pub(crate) fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
#[cfg(test)]
fn f32_of(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

static AUTOCAST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the CPU kernels' bf16 products on or off (`--bf16 --device cpu`, set by
/// `device::set_default` only where `available()`).
pub(crate) fn set_autocast(on: bool) {
    assert!(
        !on || available(),
        "bf16 autocast on a CPU without AMX-BF16 tiles"
    );
    AUTOCAST.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the CPU kernels' matrix products run in bf16 on AMX tiles.
pub(crate) fn autocast() -> bool {
    AUTOCAST.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this process can run the AMX kernel: the CPU has AMX-TILE and AMX-BF16 and
/// the kernel granted the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked
/// once per process.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(tiles::request)
}

/// A product's sizes and its packed operands' padded sizes.
#[derive(Clone, Copy)]
struct Packed {
    m: usize,
    n: usize,
    k: usize,
    mp: usize,
    np: usize,
    /// Tiles along k (32 bf16 each).
    kt: usize,
}

/// bf16 in one tile: 16 rows of 32.
const TILE: usize = 16 * 32;

impl Packed {
    fn new(m: usize, n: usize, k: usize) -> Self {
        let up = |x: usize, to: usize| x.div_ceil(to) * to;
        Packed {
            m,
            n,
            k,
            mp: up(m, BLOCK),
            np: up(n, BLOCK),
            kt: k.max(1).div_ceil(K_STEP),
        }
    }
}

thread_local! {
    /// The packed operands' memory, kept between calls on the calling thread (a
    /// fresh allocation each call is a page-fault and zero-fill pass of its own).
    static SCRATCH: std::cell::Cell<(Vec<u16>, Vec<u16>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// The most bf16 per packed operand kept between calls (32 MiB: GPT-2's LM-head
/// gradient operand, 50272 × 96 for a chunk, fits).
const SCRATCH_KEEP: usize = 16 << 20;

/// `buf` resized to `len` (its contents left as they are: every group is cleared by
/// its packer).
fn sized(mut buf: Vec<u16>, len: usize) -> Vec<u16> {
    buf.resize(len, 0);
    buf
}

/// The most groups of 16 rows (of A) or columns (of B) one task packs: up to 256
/// floats of each stored row read at a time where the matrix is stored along the
/// other side.
const GROUPS_PER_TASK: usize = 16;

/// Groups per packing task for `groups` groups: as many as leave two tasks per
/// thread, at most `GROUPS_PER_TASK`.
fn groups_per_task(groups: usize) -> usize {
    (groups / (2 * rayon::current_num_threads().max(1))).clamp(1, GROUPS_PER_TASK)
}

/// A (m × k, strides `(rs, cs)`) into tiles: for each group of 16 rows, its `kt`
/// tiles one after the other (16 rows of 32 bf16 each), rows past m and columns past
/// k zero.
fn pack_a(out: &mut [u16], a: &[f32], (rs, cs): (usize, usize), p: Packed) {
    let group = p.kt * TILE;
    let per_task = groups_per_task(p.mp / 16);
    out[..p.mp / 16 * group]
        .par_chunks_mut(per_task * group)
        .enumerate()
        .for_each(|(task, groups)| pack_a_task(groups, task, per_task, a, (rs, cs), p));
}

simd_kernel! {
    /// One task of `pack_a`: groups `task · per_task` on, into `groups` (theirs).
    fn pack_a_task(groups: &mut [u16], task: usize, per_task: usize, a: &[f32], strides: (usize, usize), p: Packed) {
        let (rs, cs) = strides;
        let group = p.kt * TILE;
        groups.fill(0);
        let i0 = task * per_task * 16;
        let h = p.m.saturating_sub(i0).min(per_task * 16);
        if h == 0 {
            return; // padding only
        }
        // Row ii's element kk: group ii / 16, its tile kk / 32, row ii % 16 there.
        let at = |ii: usize, kk: usize| {
            ii / 16 * group + kk / K_STEP * TILE + ii % 16 * K_STEP + kk % K_STEP
        };
        if cs == 1 {
            for ii in 0..h {
                let src = &a[(i0 + ii) * rs..][..p.k];
                for (t, piece) in src.chunks(K_STEP).enumerate() {
                    let dst = &mut groups[at(ii, t * K_STEP)..][..piece.len()];
                    for (d, &x) in dst.iter_mut().zip(piece) {
                        *d = bf16(x);
                    }
                }
            }
        } else {
            // Stored along m (a transposed A): 32 stored rows of up to 256 floats
            // into a block in cache, then each of its tiles' rows from a column.
            let mut blk = [[0u16; GROUPS_PER_TASK * 16]; K_STEP];
            for t in 0..p.kt {
                let kn = (p.k - t * K_STEP).min(K_STEP);
                for (kk, row) in blk.iter_mut().enumerate().take(kn) {
                    let (k, row) = (t * K_STEP + kk, &mut row[..h]);
                    if rs == 1 {
                        let src = &a[k * cs + i0..][..h];
                        for (d, &x) in row.iter_mut().zip(src) {
                            *d = bf16(x);
                        }
                    } else {
                        for (ii, d) in row.iter_mut().enumerate() {
                            *d = bf16(a[(i0 + ii) * rs + k * cs]);
                        }
                    }
                }
                // Only the kn stored columns: the rest of `blk` holds the
                // previous tile's, and the padding must stay zero.
                for ii in 0..h {
                    let dst = &mut groups[at(ii, t * K_STEP)..][..kn];
                    for (kk, d) in dst.iter_mut().enumerate() {
                        *d = blk[kk][ii];
                    }
                }
            }
        }
    }
}

/// B (k × n, strides `(rs, cs)`) into tiles in the pair-interleaved form
/// `tdpbf16ps` reads: for each group of 16 columns, its `kt` tiles one after the
/// other, tile row r holding (B[2r][j], B[2r + 1][j]) for its 16 columns j; rows past
/// k and columns past n zero.
fn pack_b(out: &mut [u16], b: &[f32], (rs, cs): (usize, usize), p: Packed) {
    let group = p.kt * TILE;
    let per_task = groups_per_task(p.np / 16);
    out[..p.np / 16 * group]
        .par_chunks_mut(per_task * group)
        .enumerate()
        .for_each(|(task, groups)| pack_b_task(groups, task, per_task, b, (rs, cs), p));
}

simd_kernel! {
    /// One task of `pack_b`: groups `task · per_task` on, into `groups` (theirs).
    fn pack_b_task(groups: &mut [u16], task: usize, per_task: usize, b: &[f32], strides: (usize, usize), p: Packed) {
        let (rs, cs) = strides;
        let group = p.kt * TILE;
        groups.fill(0);
        let j0 = task * per_task * 16;
        let w = p.n.saturating_sub(j0).min(per_task * 16);
        if w == 0 {
            return; // padding only
        }
        // Column jj's element kk: group jj / 16, its tile kk / 32, tile row
        // (kk % 32) / 2, the pair of column jj % 16 there.
        let at = |kk: usize, jj: usize| {
            jj / 16 * group
                + kk / K_STEP * TILE
                + kk % K_STEP / 2 * K_STEP
                + 2 * (jj % 16)
                + kk % 2
        };
        if cs == 1 {
            let zeros = [0f32; GROUPS_PER_TASK * 16];
            for kk in (0..p.k).step_by(2) {
                let even = &b[kk * rs + j0..][..w];
                let odd = if kk + 1 < p.k {
                    &b[(kk + 1) * rs + j0..][..w]
                } else {
                    &zeros[..w]
                };
                for (g, (e, o)) in even.chunks(16).zip(odd.chunks(16)).enumerate() {
                    let dst = &mut groups[at(kk, g * 16)..][..2 * e.len()];
                    for ((d, &x), &y) in dst.chunks_exact_mut(2).zip(e).zip(o) {
                        d[0] = bf16(x);
                        d[1] = bf16(y);
                    }
                }
            }
        } else {
            // Stored along k (a transposed B, rs = 1: each column a stored row):
            // 32 floats of a column at a time, into one tile's pairs.
            let mut col = [0u16; K_STEP];
            for jj in 0..w {
                let j = j0 + jj;
                for t in 0..p.kt {
                    let kn = (p.k - t * K_STEP).min(K_STEP);
                    if rs == 1 {
                        let src = &b[j * cs + t * K_STEP..][..kn];
                        for (d, &x) in col.iter_mut().zip(src) {
                            *d = bf16(x);
                        }
                    } else {
                        for (kk, d) in col.iter_mut().enumerate().take(kn) {
                            *d = bf16(b[(t * K_STEP + kk) * rs + j * cs]);
                        }
                    }
                    let base = at(t * K_STEP, jj);
                    for (r, pair) in col[..kn].chunks(2).enumerate() {
                        groups[base + r * K_STEP..][..pair.len()].copy_from_slice(pair);
                    }
                }
            }
        }
    }
}

/// C's pointer, handed to the pool's threads: each block of C is written by one task.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: tasks write disjoint blocks of the m·n floats `Dst` points to (see `gemm`).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// dst (m × n, row-major) = [dst +] a (m × k) · b (k × n) in bf16 with f32 sums.
///
/// # Safety
/// `available()` returned true; `dst` points to m·n floats, initialised if
/// `accumulate`, that nothing else touches during the call; every element of a and b
/// the strides address is in bounds (the caller asserts it).
pub(crate) unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    (a, a_strides): (&[f32], (usize, usize)),
    (b, b_strides): (&[f32], (usize, usize)),
) {
    debug_assert!(available());
    if m == 0 || n == 0 {
        return;
    }
    let p = Packed::new(m, n, k);
    let (pa, pb) = SCRATCH.take();
    let (mut pa, mut pb) = (sized(pa, p.mp * p.kt * 32), sized(pb, p.np * p.kt * 32));
    pack_a(&mut pa, a, a_strides, p);
    pack_b(&mut pb, b, b_strides, p);
    let (mb, nb) = (p.mp / BLOCK, p.np / BLOCK);
    let blocks = mb * nb;
    // Contiguous runs of blocks, column of blocks by column of blocks: a run reuses
    // its B panel across the A blocks below it, and loads the tile configuration once.
    let runs = blocks.min(8 * rayon::current_num_threads().max(1));
    let dst = Dst(dst);
    let group = p.kt * TILE;
    let (pa_ref, pb_ref) = (&pa[..], &pb[..]);
    (0..runs).into_par_iter().for_each(move |r| {
        let dst = dst;
        let (lo, hi) = (r * blocks / runs, (r + 1) * blocks / runs);
        // SAFETY: `available()` (the caller's contract).
        let config = unsafe { tiles::Config::load() };
        let mut c = [0f32; BLOCK * BLOCK];
        for t in lo..hi {
            let (bj, bi) = (t / mb, t % mb);
            let a_rows = &pa_ref[bi * 2 * group..][..2 * group];
            let b_cols = &pb_ref[bj * 2 * group..][..2 * group];
            tiles::block(&config, a_rows, b_cols, p.kt, &mut c);
            let (i0, j0) = (bi * BLOCK, bj * BLOCK);
            let (h, w) = ((m - i0).min(BLOCK), (n - j0).min(BLOCK));
            for ii in 0..h {
                let src = &c[ii * BLOCK..][..w];
                // SAFETY: row i0 + ii, columns j0..j0 + w of the m × n destination,
                // which only this block writes; initialised where `accumulate` (the
                // caller's contract), else written without being read.
                unsafe {
                    let at = dst.0.add((i0 + ii) * n + j0);
                    if accumulate {
                        let out = std::slice::from_raw_parts_mut(at, w);
                        for (o, s) in out.iter_mut().zip(src) {
                            *o += s;
                        }
                    } else {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), at, w);
                    }
                }
            }
        }
    });
    // Kept for the next call unless large (the LM head's packed gradient on a GPT-2
    // vocabulary is tens of MB).
    let keep = |v: Vec<u16>| {
        if v.capacity() <= SCRATCH_KEEP {
            v
        } else {
            Vec::new()
        }
    };
    SCRATCH.set((keep(pa), keep(pb)));
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod tiles {
    use super::{BLOCK, TILE};
    use std::arch::asm;

    extern "C" {
        fn syscall(number: i64, ...) -> i64;
    }

    /// CPUID leaf 7's AMX-BF16 and AMX-TILE bits, then Linux's permission for the tile
    /// data (Linux ≥ 5.16; refused where the kernel does not enable it).
    pub(super) fn request() -> bool {
        use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
        if __get_cpuid_max(0).0 < 7 {
            return false;
        }
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        // SAFETY: arch_prctl with these arguments only changes the process' permission.
        unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    /// The tile configuration `ldtilecfg` reads: palette 1, all eight tiles 16 rows of
    /// 64 bytes (bytes 16–31: each tile's bytes per row; 48–55: its rows).
    #[repr(C, align(64))]
    struct Palette([u8; 64]);

    static PALETTE: Palette = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Palette(c)
    };

    /// The tile configuration, loaded on this thread until dropped (`tilerelease`).
    /// It is machine state that compiled code, which uses no AMX, never changes, so
    /// it stays loaded between `block` calls: loading it for every block cost 7 % of a
    /// GPT-2 124M step (`perf`, most of the block kernel's time).
    ///
    /// It relies on two things: the OS saves and restores the configuration with the
    /// thread's state (XSAVE's XTILECFG), and nothing between `load` and the last
    /// `block` hands work to the pool, where another run on this thread would release
    /// it first (`gemm`'s runs only call `block` and copy). `Config` is not `Send`.
    pub(super) struct Config(std::marker::PhantomData<*const ()>);

    impl Config {
        /// # Safety
        /// `request()` returned true in this process.
        pub(super) unsafe fn load() -> Config {
            // SAFETY: a valid palette-1 configuration; the caller has the permission.
            unsafe { asm!("ldtilecfg [{}]", in(reg) PALETTE.0.as_ptr(), options(nostack)) };
            Config(std::marker::PhantomData)
        }
    }

    impl Drop for Config {
        fn drop(&mut self) {
            // SAFETY: a configuration is loaded (by `load`).
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// A 32 × 32 block of C into `c` (row-major, 32 to a row) from two groups of
    /// A's tiles (rows 0–15, then 16–31) and two groups of B's (columns 0–15, then
    /// 16–31), `kt` tiles to a group.
    ///
    /// One `asm!` statement zeroes, runs the loop over k and stores: no tile
    /// register's value lives from one statement to the next, where compiled code
    /// runs.
    ///
    pub(super) fn block(_: &Config, a: &[u16], b: &[u16], kt: usize, c: &mut [f32; BLOCK * BLOCK]) {
        let group = kt * TILE;
        assert!(kt >= 1 && a.len() >= 2 * group && b.len() >= 2 * group);
        // SAFETY: the configuration is loaded on this thread (a `Config`, not `Send`,
        // borrowed); each tile load reads one whole tile (16
        // rows of 64 bytes, 1 KiB) inside `a` or `b` by the assert, kt times, 1 KiB
        // further each time; the stores write 16 rows of 64 bytes at 128 bytes a row,
        // the four quadrants of `c` (4 KiB).
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {row}*1]",
                "tileloadd tmm5, [{a1} + {row}*1]",
                "tileloadd tmm6, [{b0} + {row}*1]",
                "tileloadd tmm7, [{b1} + {row}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 1024",
                "add {a1}, 1024",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c} + {crow}*1], tmm0",
                "tilestored [{c} + {crow}*1 + 64], tmm1",
                "tilestored [{c} + {crow}*1 + 2048], tmm2",
                "tilestored [{c} + {crow}*1 + 2112], tmm3",
                a0 = inout(reg) a.as_ptr() => _,
                a1 = inout(reg) a.as_ptr().add(group) => _,
                b0 = inout(reg) b.as_ptr() => _,
                b1 = inout(reg) b.as_ptr().add(group) => _,
                n = inout(reg) kt => _,
                row = in(reg) 64usize,
                c = in(reg) c.as_mut_ptr(),
                crow = in(reg) BLOCK * 4,
                options(nostack)
            );
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod tiles {
    use super::BLOCK;

    pub(super) fn request() -> bool {
        false
    }

    pub(super) struct Config(());

    impl Config {
        pub(super) unsafe fn load() -> Config {
            unreachable!("AMX tiles are used on x86_64 Linux only")
        }
    }

    pub(super) fn block(_: &Config, _: &[u16], _: &[u16], _: usize, _: &mut [f32; BLOCK * BLOCK]) {
        unreachable!("AMX tiles are used on x86_64 Linux only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan_inf_and_signs() {
        assert_eq!(bf16(1.0), 0x3F80);
        assert_eq!(bf16(-2.0), 0xC000);
        assert_eq!(bf16(0.0), 0x0000);
        assert_eq!(bf16(-0.0), 0x8000);
        assert_eq!(bf16(f32::INFINITY), 0x7F80);
        assert_eq!(bf16(f32::NEG_INFINITY), 0xFF80);
        assert!(f32_of(bf16(f32::NAN)).is_nan());
        assert!(f32_of(bf16(f32::from_bits(0x7FFF_FFFF))).is_nan());
        assert!(f32_of(bf16(f32::from_bits(0xFFFF_FFFF))).is_nan());
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: up to the even one.
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3F82);
        // Just above halfway rounds up.
        assert_eq!(bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
        // The largest finite f32 rounds to infinity, as RNE says.
        assert_eq!(bf16(f32::MAX), 0x7F80);
        for x in [0.1f32, -3.7, 1e-20, 6.5e4, 123.456] {
            assert!((f32_of(bf16(x)) - x).abs() <= x.abs() / 256.0, "{x}");
        }
    }

    /// The products of the bf16 roundings of a and b, summed in f64: what the kernel
    /// computes up to its f32 sums.
    fn reference(
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        (ars, acs): (usize, usize),
        b: &[f32],
        (brs, bcs): (usize, usize),
    ) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|kk| {
                        f32_of(bf16(a[i * ars + kk * acs])) as f64
                            * f32_of(bf16(b[kk * brs + j * bcs])) as f64
                    })
                    .sum();
            }
        }
        c
    }

    /// `tdpbf16ps` in scalar code over the packed operands: C (mp × np) from every
    /// tile pair along k, in the order the hardware's block loop takes them.
    fn emulate(pa: &[u16], pb: &[u16], p: Packed) -> Vec<f32> {
        let group = p.kt * TILE;
        let mut c = vec![0f32; p.mp * p.np];
        for i in 0..p.mp {
            for j in 0..p.np {
                let mut acc = 0f32;
                for t in 0..p.kt {
                    let a = &pa[i / 16 * group + t * TILE + i % 16 * K_STEP..][..K_STEP];
                    let b = &pb[j / 16 * group + t * TILE..][..TILE];
                    for r in 0..16 {
                        let bp = &b[r * K_STEP + 2 * (j % 16)..][..2];
                        acc +=
                            f32_of(a[2 * r]) * f32_of(bp[0]) + f32_of(a[2 * r + 1]) * f32_of(bp[1]);
                    }
                }
                c[i * p.np + j] = acc;
            }
        }
        c
    }

    /// Shapes with partial tiles on every side, several k tiles, and (at 1 or 2
    /// threads) several groups per packing task.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 1, 1),
        (16, 16, 32),
        (33, 31, 65),
        (70, 5, 3),
        (3, 70, 200),
        (64, 96, 128),
        (100, 40, 17),
        (300, 20, 40),
        (20, 300, 70),
    ];

    /// A matrix's row and column strides.
    type Strides = (usize, usize);

    /// How a test operand is stored: row-major, transposed, or every other float of
    /// rows twice as long (neither stride 1).
    const LAYOUTS: [&str; 3] = ["rows", "transposed", "strided"];

    /// The strides of a (rows × cols) matrix stored as `LAYOUTS[layout]`, and the
    /// floats that takes.
    fn layout(layout: usize, rows: usize, cols: usize) -> (Strides, usize) {
        match layout {
            0 => ((cols, 1), rows * cols),
            1 => ((1, rows), rows * cols),
            _ => ((2 * cols, 2), 2 * rows * cols),
        }
    }

    /// A random product's operands, A and B each stored as `LAYOUTS` says.
    fn operands(
        rng: &mut rand_chacha::ChaCha8Rng,
        (m, n, k): (usize, usize, usize),
        (la, lb): (usize, usize),
    ) -> (Vec<f32>, Strides, Vec<f32>, Strides) {
        let ((sa, a_len), (sb, b_len)) = (layout(la, m, k), layout(lb, k, n));
        let a: Vec<f32> = (0..a_len).map(|_| rng.random_range(-2.0..2.0)).collect();
        let b: Vec<f32> = (0..b_len).map(|_| rng.random_range(-2.0..2.0)).collect();
        (a, sa, b, sb)
    }

    #[test]
    fn packed_tiles_hold_the_bf16_operands_with_zero_padding_on_any_cpu() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for &(m, n, k) in &SHAPES {
            for (la, ta) in LAYOUTS.iter().enumerate() {
                for (lb, tb) in LAYOUTS.iter().enumerate() {
                    let (mut a, sa, b, sb) = operands(&mut rng, (m, n, k), (la, lb));
                    let p = Packed::new(m, n, k);
                    // An infinity in row 0 at the last column of the next-to-last k tile
                    // (where k ends inside the last one): its row must come out ±inf,
                    // not NaN, which a stale copy of it in the last tile's padding would
                    // give against B's zero rows.
                    let kk_inf = if k % K_STEP != 0 && p.kt >= 2 {
                        (p.kt - 1) * K_STEP - 1
                    } else {
                        0
                    };
                    a[kk_inf * sa.1] = f32::INFINITY;
                    let mut packed = vec![];
                    for threads in [1, 2] {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(threads)
                            .build()
                            .unwrap();
                        // Packing over memory full of garbage: every element is written.
                        let mut pa = vec![0xFFFFu16; p.mp * p.kt * 32];
                        let mut pb = vec![0xFFFFu16; p.np * p.kt * 32];
                        pool.install(|| {
                            pack_a(&mut pa, &a, sa, p);
                            pack_b(&mut pb, &b, sb, p);
                        });
                        packed.push((pa, pb));
                    }
                    assert_eq!(packed[0], packed[1], "packing depends on the thread count");
                    let (pa, pb) = &packed[0];
                    let group = p.kt * TILE;
                    for i in 0..p.mp {
                        for kk in 0..p.kt * K_STEP {
                            let got = pa[i / 16 * group
                                + kk / K_STEP * TILE
                                + i % 16 * K_STEP
                                + kk % K_STEP];
                            let want = if i < m && kk < k {
                                bf16(a[i * sa.0 + kk * sa.1])
                            } else {
                                0
                            };
                            assert_eq!(got, want, "A {m}×{k} ta {ta} at ({i}, {kk})");
                        }
                    }
                    for kk in 0..p.kt * K_STEP {
                        for j in 0..p.np {
                            let at = j / 16 * group
                                + kk / K_STEP * TILE
                                + kk % K_STEP / 2 * K_STEP
                                + 2 * (j % 16)
                                + kk % 2;
                            let want = if kk < k && j < n {
                                bf16(b[kk * sb.0 + j * sb.1])
                            } else {
                                0
                            };
                            assert_eq!(pb[at], want, "B {k}×{n} tb {tb} at ({kk}, {j})");
                        }
                    }
                    let c = emulate(pa, pb, p);
                    let want = reference((m, n, k), &a, sa, &b, sb);
                    for i in 0..m {
                        for j in 0..n {
                            let (got, w) = (c[i * p.np + j] as f64, want[i * n + j]);
                            let ok = if w.is_infinite() {
                                got == w
                            } else {
                                (got - w).abs() <= 1e-5 * (k as f64 + 1.0) * 4.0
                            };
                            assert!(
                                ok,
                                "{m}×{n}×{k} ta {ta} tb {tb} at ({i}, {j}): {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn amx_products_are_the_bf16_products_summed_in_f32() {
        if !available() {
            // RLHF_REQUIRE_AMX=1 (on a runner known to have AMX) makes the skip a failure.
            assert!(
                std::env::var_os("RLHF_REQUIRE_AMX").is_none(),
                "RLHF_REQUIRE_AMX is set but this CPU or its kernel offers no AMX-BF16 tiles"
            );
            println!("skipped: this CPU or its kernel offers no AMX-BF16 tiles");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(m, n, k) in SHAPES.iter().chain(&[(600, 520, 300)]) {
            for (la, ta) in LAYOUTS.iter().enumerate() {
                for (lb, tb) in LAYOUTS.iter().enumerate() {
                    for accumulate in [false, true] {
                        let (a, sa, b, sb) = operands(&mut rng, (m, n, k), (la, lb));
                        let start: Vec<f32> =
                            (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                        let mut results = vec![];
                        for threads in [1, 2] {
                            let pool = rayon::ThreadPoolBuilder::new()
                                .num_threads(threads)
                                .build()
                                .unwrap();
                            let mut c = if accumulate {
                                start.clone()
                            } else {
                                vec![f32::NAN; m * n]
                            };
                            // SAFETY: AMX is available; c holds m·n floats, initialised.
                            pool.install(|| unsafe {
                                gemm((m, n, k), c.as_mut_ptr(), accumulate, (&a, sa), (&b, sb))
                            });
                            results.push(c);
                        }
                        let bits = |c: &[f32]| c.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&results[0]),
                            bits(&results[1]),
                            "{m}×{n}×{k}: bits depend on the threads"
                        );
                        if !accumulate && m >= 2 {
                            // A row's bits do not depend on how many rows share the call.
                            let h = m / 2;
                            let mut top = vec![f32::NAN; h * n];
                            // SAFETY: AMX is available; top holds h·n floats.
                            unsafe { gemm((h, n, k), top.as_mut_ptr(), false, (&a, sa), (&b, sb)) };
                            assert_eq!(
                                bits(&top),
                                bits(&results[0][..h * n]),
                                "{m}×{n}×{k}: the first {h} rows alone differ"
                            );
                        }
                        let want = reference((m, n, k), &a, sa, &b, sb);
                        for (idx, (&got, &w)) in results[0].iter().zip(&want).enumerate() {
                            let w = w + if accumulate { start[idx] as f64 } else { 0.0 };
                            // f32 sums of k products of size ≤ 4: error ≲ k · 4 · 2⁻²³.
                            let tol = 1e-5 * (k as f64 + 1.0) * 4.0;
                            assert!(
                                (got as f64 - w).abs() <= tol,
                                "{m}×{n}×{k} ta {ta} tb {tb} acc {accumulate} at {idx}: {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
