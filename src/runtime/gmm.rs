//! A Gaussian mixture fitted to codes, to sample any autoencoder: Ghosh et al. 2020 ("From
//! variational to deterministic autoencoders") fit one to a trained model's training codes and
//! decode its draws — so a plain, sparse or contractive autoencoder generates too.
//!
//! Full covariances, fitted by expectation–maximisation in f64 from a k-means++ start (Lloyd's
//! iterations after it), each covariance regularised by 1e-6 on its diagonal as scikit-learn's
//! `GaussianMixture` does; every random choice is a function of the seed.

use rand::{RngExt, SeedableRng};

/// A mixture of `k` Gaussians in `dim` dimensions.
#[derive(Clone, Debug)]
pub struct Gmm {
    pub dim: usize,
    pub weights: Vec<f64>,
    pub means: Vec<Vec<f64>>,
    /// The lower Cholesky factor of each covariance, row-major `dim × dim`.
    pub chol: Vec<Vec<f64>>,
}

/// The outcome of a fit: the mixture, its mean log-likelihood per sample after each iteration.
#[derive(Clone, Debug)]
pub struct Fit {
    pub gmm: Gmm,
    pub history: Vec<f64>,
    pub converged: bool,
}

const REG: f64 = 1e-6;
const TOL: f64 = 1e-6;
const MAX_ITER: usize = 300;

/// Fits `k` components to the `n = x.len() / dim` points of `x`.
pub fn fit(x: &[f32], dim: usize, k: usize, seed: u64) -> Result<Fit, String> {
    let n = x.len().checked_div(dim).unwrap_or(0);
    if k == 0 {
        return Err("a mixture needs at least one component".into());
    }
    if n < k {
        return Err(format!("{n} codes cannot fit {k} components: use at most {n}"));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(format!("code {} holds {}", i / dim, x[i]));
    }
    let pts: Vec<Vec<f64>> = x.chunks(dim).map(|p| p.iter().map(|&v| f64::from(v)).collect()).collect();
    let labels = kmeans(&pts, k, seed);
    // The first M-step from the k-means partition.
    let mut resp = vec![vec![0.0; k]; n];
    for (r, &l) in resp.iter_mut().zip(&labels) {
        r[l] = 1.0;
    }
    let mut gmm = m_step(&pts, &resp, dim)?;
    let mut history = Vec::new();
    let mut converged = false;
    for _ in 0..MAX_ITER {
        let ll = e_step(&gmm, &pts, &mut resp);
        let better = history.last().is_none_or(|&last: &f64| (ll - last).abs() >= TOL);
        history.push(ll);
        if !better {
            converged = true;
            break;
        }
        gmm = m_step(&pts, &resp, dim)?;
    }
    Ok(Fit { gmm, history, converged })
}

/// k-means++ seeding, then Lloyd's iterations: each point's cluster.
fn kmeans(pts: &[Vec<f64>], k: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6A09_E667_F3BC_C908);
    let dist = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f64>();
    let mut centres = vec![pts[rng.random_range(0..pts.len())].clone()];
    let mut near: Vec<f64> = pts.iter().map(|p| dist(p, &centres[0])).collect();
    while centres.len() < k {
        let total: f64 = near.iter().sum();
        let next = if total > 0.0 {
            let mut t = rng.random::<f64>() * total;
            near.iter().position(|&d| {
                t -= d;
                t < 0.0
            })
        } else {
            None
        };
        let c = pts[next.unwrap_or_else(|| rng.random_range(0..pts.len()))].clone();
        for (d, p) in near.iter_mut().zip(pts) {
            *d = d.min(dist(p, &c));
        }
        centres.push(c);
    }
    let mut labels = vec![0; pts.len()];
    for _ in 0..100 {
        let mut moved = false;
        for (l, p) in labels.iter_mut().zip(pts) {
            let best =
                (0..k).min_by(|&a, &b| dist(p, &centres[a]).total_cmp(&dist(p, &centres[b]))).unwrap_or(0);
            moved |= best != *l;
            *l = best;
        }
        for (c, centre) in centres.iter_mut().enumerate() {
            let members: Vec<&Vec<f64>> =
                pts.iter().zip(&labels).filter(|(_, l)| **l == c).map(|(p, _)| p).collect();
            if !members.is_empty() {
                for (j, v) in centre.iter_mut().enumerate() {
                    *v = members.iter().map(|p| p[j]).sum::<f64>() / members.len() as f64;
                }
            }
        }
        if !moved {
            break;
        }
    }
    labels
}

/// Weights, means and (regularised) covariances from the responsibilities.
fn m_step(pts: &[Vec<f64>], resp: &[Vec<f64>], dim: usize) -> Result<Gmm, String> {
    let k = resp.first().map_or(0, Vec::len);
    let n = pts.len() as f64;
    let mut g = Gmm { dim, weights: Vec::new(), means: Vec::new(), chol: Vec::new() };
    for c in 0..k {
        let nk = resp.iter().map(|r| r[c]).sum::<f64>() + 10.0 * f64::EPSILON;
        let mut mean = vec![0.0; dim];
        for (p, r) in pts.iter().zip(resp) {
            for (m, v) in mean.iter_mut().zip(p) {
                *m += r[c] * v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= nk);
        let mut cov = vec![0.0; dim * dim];
        for (p, r) in pts.iter().zip(resp) {
            for i in 0..dim {
                let di = p[i] - mean[i];
                for j in 0..=i {
                    cov[i * dim + j] += r[c] * di * (p[j] - mean[j]);
                }
            }
        }
        for i in 0..dim {
            for j in 0..=i {
                cov[i * dim + j] /= nk;
                cov[j * dim + i] = cov[i * dim + j];
            }
            cov[i * dim + i] += REG;
        }
        g.weights.push(nk / n);
        g.means.push(mean);
        g.chol.push(cholesky(&cov, dim).ok_or("a component's covariance is not positive definite")?);
    }
    Ok(g)
}

/// The responsibilities of each component for each point; the mean log-likelihood.
fn e_step(g: &Gmm, pts: &[Vec<f64>], resp: &mut [Vec<f64>]) -> f64 {
    let mut total = 0.0;
    for (p, r) in pts.iter().zip(resp.iter_mut()) {
        for (c, rc) in r.iter_mut().enumerate() {
            *rc = g.weights[c].ln() + g.log_density(c, p);
        }
        let top = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = r.iter().map(|v| (v - top).exp()).sum();
        let lse = top + sum.ln();
        r.iter_mut().for_each(|v| *v = (*v - lse).exp());
        total += lse;
    }
    total / pts.len().max(1) as f64
}

impl Gmm {
    /// log N(p | μ_c, Σ_c).
    fn log_density(&self, c: usize, p: &[f64]) -> f64 {
        let (d, l, mu) = (self.dim, &self.chol[c], &self.means[c]);
        // Solve L y = p − μ: the Mahalanobis distance is |y|².
        let mut y = vec![0.0; d];
        for i in 0..d {
            let s: f64 = (0..i).map(|j| l[i * d + j] * y[j]).sum();
            y[i] = (p[i] - mu[i] - s) / l[i * d + i];
        }
        let maha: f64 = y.iter().map(|v| v * v).sum();
        let log_det: f64 = (0..d).map(|i| l[i * d + i].ln()).sum::<f64>() * 2.0;
        -0.5 * (d as f64 * std::f64::consts::TAU.ln() + log_det + maha)
    }

    /// The mean log-likelihood per point of `x`.
    pub fn log_likelihood(&self, x: &[f32]) -> f64 {
        let pts: Vec<Vec<f64>> =
            x.chunks(self.dim).map(|p| p.iter().map(|&v| f64::from(v)).collect()).collect();
        let mut resp = vec![vec![0.0; self.weights.len()]; pts.len()];
        e_step(self, &pts, &mut resp)
    }

    /// `n` draws, `dim` values each: a component by its weight, then μ + L ε with ε ~ N(0, I)
    /// from aec's counter-based generator (the same seed, the same draws).
    pub fn sample(&self, n: usize, seed: u64) -> Vec<f32> {
        let d = self.dim;
        let mut out = Vec::with_capacity(n * d);
        for s in 0..n {
            let u = f64::from(crate::rng::uniform(seed, 0, 7, s));
            let mut acc = 0.0;
            let c = self
                .weights
                .iter()
                .position(|w| {
                    acc += w;
                    u < acc
                })
                .unwrap_or(self.weights.len() - 1);
            let eps: Vec<f64> =
                (0..d).map(|i| f64::from(crate::rng::normal(seed, 0, 8, s * d + i))).collect();
            let l = &self.chol[c];
            for i in 0..d {
                let v: f64 = (0..=i).map(|j| l[i * d + j] * eps[j]).sum();
                out.push((self.means[c][i] + v) as f32);
            }
        }
        out
    }
}

/// The lower Cholesky factor of a symmetric positive definite `d × d` matrix.
fn cholesky(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            if i == j {
                let v = a[i * d + i] - s;
                if v.is_nan() || v <= 0.0 {
                    return None;
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (a[i * d + j] - s) / l[j * d + j];
            }
        }
    }
    Some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points from a known two-component mixture in 2-D.
    fn two_blobs(n: usize) -> Vec<f32> {
        let mut x = Vec::new();
        for i in 0..n {
            let (a, b) = (crate::rng::normal(9, 0, 1, 2 * i), crate::rng::normal(9, 0, 1, 2 * i + 1));
            if i % 4 == 0 {
                // 25%: centred at (4, −2), σ = 0.5 on each axis.
                x.extend([4.0 + 0.5 * a, -2.0 + 0.5 * b]);
            } else {
                // 75%: centred at (−1, 1), correlated: y = x + small noise.
                x.extend([-1.0 + a, 1.0 + a + 0.3 * b]);
            }
        }
        x
    }

    #[test]
    fn em_finds_the_components_of_a_known_mixture() {
        let x = two_blobs(4000);
        let f = fit(&x, 2, 2, 3).expect("fits");
        assert!(f.converged);
        // EM never lowers the likelihood.
        assert!(f.history.windows(2).all(|w| w[1] >= w[0] - 1e-9), "{:?}", f.history);
        let g = &f.gmm;
        let small = if g.weights[0] < g.weights[1] { 0 } else { 1 };
        let big = 1 - small;
        assert!((g.weights[small] - 0.25).abs() < 0.02, "{:?}", g.weights);
        assert!((g.means[small][0] - 4.0).abs() < 0.05 && (g.means[small][1] + 2.0).abs() < 0.05);
        assert!((g.means[big][0] + 1.0).abs() < 0.1 && (g.means[big][1] - 1.0).abs() < 0.1);
        // The big component's covariance: var 1 on x, cov 1 with y, var 1.09 on y.
        let l = &g.chol[big];
        let (v00, v10, v11) = (l[0] * l[0], l[2] * l[0], l[2] * l[2] + l[3] * l[3]);
        assert!((v00 - 1.0).abs() < 0.1 && (v10 - 1.0).abs() < 0.1 && (v11 - 1.09).abs() < 0.1);
    }

    #[test]
    fn one_component_is_the_sample_mean_and_covariance() {
        let x = two_blobs(500);
        let g = fit(&x, 2, 1, 0).expect("fits").gmm;
        let n = 500.0;
        let mean: Vec<f64> =
            (0..2).map(|j| x.iter().skip(j).step_by(2).map(|&v| f64::from(v)).sum::<f64>() / n).collect();
        let var0 = x.iter().step_by(2).map(|&v| (f64::from(v) - mean[0]).powi(2)).sum::<f64>() / n + REG;
        assert!((g.means[0][0] - mean[0]).abs() < 1e-9 && (g.means[0][1] - mean[1]).abs() < 1e-9);
        assert!((g.chol[0][0] * g.chol[0][0] - var0).abs() < 1e-9);
        assert_eq!(g.weights, vec![1.0]);
    }

    #[test]
    fn draws_follow_the_mixture_and_repeat_with_the_seed() {
        let g = fit(&two_blobs(4000), 2, 2, 3).expect("fits").gmm;
        let s = g.sample(20000, 11);
        assert_eq!(s, g.sample(20000, 11));
        assert_ne!(s, g.sample(20000, 12));
        let right = s.chunks(2).filter(|p| p[0] > 1.5).count() as f64 / 20000.0;
        assert!((right - 0.25).abs() < 0.02, "{right}");
        // Their likelihood under the mixture is the data's.
        assert!((g.log_likelihood(&s) - g.log_likelihood(&two_blobs(4000))).abs() < 0.05);
    }

    #[test]
    fn too_few_codes_and_bad_values_are_refused() {
        assert!(fit(&[0.0, 1.0, 2.0, 3.0], 2, 3, 0).err().unwrap().contains("2 codes cannot fit 3"));
        assert!(fit(&[0.0, f32::NAN], 2, 1, 0).err().unwrap().contains("NaN"));
        // Identical points: the regularisation keeps the covariance positive definite.
        let g = fit(&[1.0; 20], 2, 2, 0).expect("fits").gmm;
        assert!(g.sample(3, 0).iter().all(|v| (v - 1.0).abs() < 0.01));
    }
}
