//! The counter-based random generator: every random number of a run is a function of (seed,
//! step, salt, element index), so every backend and every thread draws the same ones.

/// A counter-based random draw in [0, 1): the same for every backend and every thread.
pub fn uniform(seed: u64, step: u64, salt: u32, i: usize) -> f32 {
    let mut z = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (u64::from(salt) << 48)
        ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// A counter-based draw from N(0, 1): Box–Muller over the draws `2i` and `2i + 1` of
/// `uniform`, in f64 (the native code calls this same function, so both backends draw the same ε).
pub fn normal(seed: u64, step: u64, salt: u32, i: usize) -> f32 {
    let u1 = 1.0 - f64::from(uniform(seed, step, salt, 2 * i)); // in (0, 1]: ln is finite
    let u2 = f64::from(uniform(seed, step, salt, 2 * i + 1));
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
