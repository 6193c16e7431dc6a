//! Variational autoencoders end to end: training a Gaussian code, `aec sample` and
//! `aec interpolate` on both backends, and their errors.

mod common;
use common::{aec, s, scratch};
use std::path::Path;

fn f32s(a: &aec::data::Array) -> &[f32] {
    match &a.values {
        aec::data::Values::F32(v) => v,
        aec::data::Values::I32(_) => panic!("not f32"),
    }
}

fn read(p: &Path) -> aec::data::Array {
    aec::data::read_npy(p).expect("npy")
}

/// `aec sample SPEC --weights W --output DIR/NAME EXTRA…`, which must succeed; what it wrote.
fn sample_to(spec: &str, w: &str, path: &Path, extra: &[&str]) -> aec::data::Array {
    let mut args = vec!["sample", spec, "--weights", w, "--output", s(path)];
    args.extend_from_slice(extra);
    let (code, _, err) = aec(&args);
    assert_eq!(code, 0, "{err}");
    read(path)
}

fn train(spec: &str, dir: &Path, epochs: &str) -> String {
    let (code, _, err) = aec(&["run", "--train", spec, "--epochs", epochs, "--out", s(dir)]);
    assert_eq!(code, 0, "{err}");
    dir.join("checkpoint.safetensors").to_str().expect("utf-8").to_owned()
}

#[test]
fn a_vae_trains_and_reports_both_terms_for_training_and_validation() {
    let dir = scratch("vae-train");
    train("specs/vae_digits.ae", &dir, "30");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    let first: serde_json::Value =
        serde_json::from_str(metrics.lines().next().expect("a line")).expect("json");
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("a line")).expect("json");
    for key in ["terms", "val_terms"] {
        for term in ["bce", "kl"] {
            assert!(last[key][term].as_f64().is_some_and(f64::is_finite), "{key}.{term} in {last}");
        }
    }
    // The summed BCE of a batch of 64 falls as it learns; the KL term is positive.
    let bce = |v: &serde_json::Value| v["terms"]["bce"].as_f64().expect("bce");
    assert!(bce(&last) < 0.8 * bce(&first), "{first} → {last}");
    assert!(last["terms"]["kl"].as_f64().expect("kl") > 0.0, "{last}");
    let total = last["terms"]["bce"].as_f64().expect("bce") + last["terms"]["kl"].as_f64().expect("kl");
    assert!((total - last["train_loss"].as_f64().expect("loss")).abs() < 1e-6 * total, "{last}");
}

#[test]
fn sample_draws_from_the_prior_reproducibly_on_both_backends() {
    let dir = scratch("vae-sample");
    let w = train("specs/vae_digits.ae", &dir, "5");
    let out = |name: &str, extra: &[&str]| sample_to("specs/vae_digits.ae", &w, &dir.join(name), extra);
    let a = out("a.npy", &["--count", "7", "--seed", "3"]);
    let b = out("b.npy", &["--count", "7", "--seed", "3", "--backend", "interp"]);
    let c = out("c.npy", &["--count", "7", "--seed", "4"]);
    assert_eq!(a.shape, vec![7, 1, 8, 8]);
    assert!(f32s(&a).iter().all(|v| (0.0..=1.0).contains(v)), "a sigmoid output");
    let diff = f32s(&a).iter().zip(f32s(&b)).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "native and interpreter differ by {diff}");
    assert_ne!(f32s(&a), f32s(&c), "another seed, other codes");
    let grid = out("grid.npy", &["--grid", "--count", "5"]);
    assert_eq!(grid.shape, vec![25, 1, 8, 8]);
    let png = dir.join("grid.png");
    let (code, _, err) =
        aec(&["sample", "specs/vae_digits.ae", "--weights", &w, "--grid", "--count", "4", "--png", s(&png)]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&png).expect("png").starts_with(b"\x89PNG"));
}

#[test]
fn interpolation_starts_and_ends_at_the_reconstructions() {
    // The ends of each line are the codes of the inputs, so decoding them is `aec run`: for a
    // VAE (its code is `mu` outside training) and for a plain autoencoder.
    for spec in ["specs/vae_digits.ae", "specs/digits_mlp.ae"] {
        interpolation_ends_at_reconstructions(spec);
    }
}

fn interpolation_ends_at_reconstructions(spec: &str) {
    let dir = scratch(&format!("interpolate-{}", spec.trim_start_matches("specs/").trim_end_matches(".ae")));
    let w = train(spec, &dir, "3");
    let digits = read(&common::root().join("specs/data/digits-images.npy"));
    let three = aec::data::Array {
        shape: vec![3, 8, 8],
        values: match &digits.values {
            aec::data::Values::F32(v) => aec::data::Values::F32(v[..192].to_vec()),
            aec::data::Values::I32(_) => panic!("digits are read as f32"),
        },
    };
    let x = dir.join("x.npy");
    aec::data::write_npy(&x, &three).expect("write");
    let (line, recon) = (dir.join("line.npy"), dir.join("recon.npy"));
    let (code, _, err) =
        aec(&["interpolate", spec, "--weights", &w, "--input", s(&x), "--steps", "5", "--output", s(&line)]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = aec(&["run", spec, "--weights", &w, "--input", s(&x), "--output", s(&recon)]);
    assert_eq!(code, 0, "{err}");
    let (line, recon) = (read(&line), read(&recon));
    assert_eq!(line.shape[0], 10, "two lines of five points");
    let per = recon.sample_len();
    let at = |a: &aec::data::Array, i: usize| f32s(a)[i * per..(i + 1) * per].to_vec();
    for (point, sample) in [(0, 0), (4, 1), (5, 1), (9, 2)] {
        let d =
            at(&line, point).iter().zip(at(&recon, sample)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-5, "{spec}: point {point} is not the reconstruction of sample {sample}: {d}");
    }
}

#[test]
fn generation_errors_say_why() {
    let dir = scratch("vae-errors");
    let conv = train("specs/digits_conv.ae", &dir.join("conv"), "1");
    let mlp = train("specs/digits_mlp.ae", &dir.join("mlp"), "1");
    let conv_vae = train("specs/vae_conv.ae", &dir.join("vae"), "1");
    let out = dir.join("o.npy");
    let x = common::root().join("specs/data/digits-images.npy");
    let cases: [(Vec<&str>, i32, &str); 5] = [
        (vec!["sample", "specs/digits_mlp.ae", "--weights", &mlp, "--output", s(&out)], 1, "Gaussian code"),
        (
            vec!["sample", "specs/vae_conv.ae", "--weights", &conv_vae, "--grid", "--output", s(&out)],
            1,
            "2-D code",
        ),
        (vec!["sample", "specs/vae_digits.ae", "--weights", &mlp], 2, "--output"),
        (
            vec![
                "interpolate",
                "specs/digits_conv.ae",
                "--weights",
                &conv,
                "--input",
                s(&x),
                "--output",
                s(&out),
            ],
            1,
            "switches",
        ),
        (
            vec![
                "interpolate",
                "specs/digits_mlp.ae",
                "--weights",
                &mlp,
                "--input",
                "nowhere.npy",
                "--png",
                "a.png",
            ],
            2,
            "does not exist",
        ),
    ];
    for (args, want, says) in cases {
        let (code, _, err) = aec(&args);
        assert_eq!(code, want, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn any_autoencoder_samples_from_a_mixture_fitted_to_its_training_codes() {
    // A plain autoencoder has no prior; `--gmm K` fits one to its training codes.
    let dir = scratch("gmm-sample");
    let w = train("specs/digits_mlp.ae", &dir, "20");
    let run = |extra: &[&str]| {
        let x = dir.join("x.npy");
        aec(&[&["sample", "specs/digits_mlp.ae", "--weights", &w, "--output", s(&x)], extra].concat())
    };
    let sample = |seed: &str, name: &str| {
        let (code, _, err) = run(&["--gmm", "4", "--count", "9", "--seed", seed]);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("fitted 4 Gaussians (full covariances) to 1617 training codes of 16 values"),
            "{err}"
        );
        let kept = dir.join(name);
        std::fs::rename(dir.join("x.npy"), &kept).expect("rename");
        read(&kept)
    };
    let (a, b, c) = (sample("1", "a.npy"), sample("1", "b.npy"), sample("2", "c.npy"));
    assert_eq!(a.shape, vec![9, 8, 8]);
    assert_eq!(f32s(&a), f32s(&b), "the same seed, the same samples");
    assert_ne!(f32s(&a), f32s(&c));
    assert!(f32s(&a).iter().all(|v| (0.0..=1.0).contains(v)), "a sigmoid's outputs");
    // Without --gmm the plain autoencoder is refused, with the way out; --grid is the prior's.
    let (code, _, err) = run(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("`--gmm K`"), "{err}");
    let (code, _, err) = run(&["--gmm", "3", "--grid"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_vq_vae_reports_its_codebook_encodes_ids_and_resumes_with_its_averages() {
    let dir = scratch("vq");
    let w = train("specs/vqvae_digits.ae", &dir, "3");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).expect("json");
        let (p, u) = (m["codebook_perplexity"].as_f64(), m["codebook_usage"].as_f64());
        assert!(p.is_some_and(|p| (1.0..=32.0).contains(&p)), "{m}");
        assert!(u.is_some_and(|u| u > 0.0 && u <= 1.0), "{m}");
        assert!(m["terms"]["vq"].as_f64().is_some_and(|v| v > 0.0), "{m}");
    }
    // `aec encode`: one id per position of the 4×4 code (i32), and with --vectors the
    // codebook vectors those ids pick.
    let input = common::root().join("specs/data/five.npy");
    let (ids_path, vec_path) = (dir.join("ids.npy"), dir.join("vectors.npy"));
    for (path, extra) in [(&ids_path, None), (&vec_path, Some("--vectors"))] {
        let mut args = vec!["encode", "specs/vqvae_digits.ae", "--weights", &w, "--input", s(&input)];
        args.extend(["--output", s(path)]);
        args.extend(extra);
        let (code, _, err) = aec(&args);
        assert_eq!(code, 0, "{err}");
    }
    let (ids, vectors) = (read(&ids_path), read(&vec_path));
    assert_eq!(ids.shape, [5, 4, 4]);
    assert_eq!(vectors.shape, [5, 8, 4, 4]);
    let aec::data::Values::I32(ids) = &ids.values else { panic!("ids are not i32") };
    let ckpt = aec::runtime::checkpoint::read_all(Path::new(&w)).expect("checkpoint");
    let book = &ckpt.iter().find(|t| t.0 == "encoder.3.codebook").expect("a codebook").2;
    let v = f32s(&vectors);
    for (i, &id) in ids.iter().enumerate() {
        let (sample, pos) = (i / 16, i % 16);
        for c in 0..8 {
            assert_eq!(v[sample * 128 + c * 16 + pos], book[id as usize * 8 + c], "position {i}");
        }
    }
    // A codebook trained by its loss (Adam's moments with it) and one kept by moving averages:
    // an interrupted run resumes to the same bytes.
    let spec = std::fs::read_to_string(common::root().join("specs/vqvae_digits.ae")).expect("spec");
    let data = common::root().join("specs/data/digits-images.npy");
    let spec = spec.replace("data/digits-images.npy", s(&data));
    for (name, quantize) in [("loss", "quantize 32"), ("ema", "quantize(ema: 0.9) 32")] {
        let path = dir.join(format!("{name}.ae"));
        std::fs::write(&path, spec.replace("quantize 32", quantize)).expect("write");
        let (whole, part) = (dir.join(format!("{name}-whole")), dir.join(format!("{name}-part")));
        for args in [
            vec!["run", "--train", s(&path), "--epochs", "3", "--out", s(&whole)],
            vec!["run", "--train", s(&path), "--epochs", "3", "--stop-at", "1", "--out", s(&part)],
            vec!["run", "--train", s(&path), "--epochs", "3", "--resume", s(&part)],
        ] {
            let (code, _, err) = aec(&args);
            assert_eq!(code, 0, "{err}");
        }
        let bytes = |d: &Path| std::fs::read(d.join("checkpoint.safetensors")).expect("checkpoint");
        assert_eq!(bytes(&whole), bytes(&part), "{quantize}: the resumed run differs");
        let saved = aec::runtime::checkpoint::read_all(&whole.join("checkpoint.safetensors")).expect("read");
        let counted = saved.iter().any(|t| t.0 == "encoder.3.ema_count" && t.2.iter().any(|&c| c > 0.0));
        assert_eq!(counted, name == "ema", "{quantize}: the moving averages");
    }
}

#[test]
fn a_conditional_vae_draws_the_class_asked_for_and_says_what_is_missing() {
    let dir = scratch("cvae");
    let w = train("specs/cvae_digits.ae", &dir, "40");
    let sample = |name: &str, extra: &[&str]| sample_to("specs/cvae_digits.ae", &w, &dir.join(name), extra);
    let all = sample("all.npy", &["--condition", "all", "--count", "20", "--seed", "4"]);
    assert_eq!(all.shape, [200, 8, 8]);
    // The same codes under one class: that class's row of `all`, on either backend.
    let three =
        sample("three.npy", &["--condition", "3", "--count", "20", "--seed", "4", "--backend", "interp"]);
    let row = &f32s(&all)[3 * 20 * 64..4 * 20 * 64];
    assert!(f32s(&three).iter().zip(row).all(|(a, b)| (a - b).abs() < 1e-5));
    // Each drawn digit is nearest the mean image of the class it was drawn for (a nearest-mean
    // classifier of the real digits, which the network never saw): the condition steers it.
    let images = read(&common::root().join("specs/data/digits-images.npy"));
    let labels = read(&common::root().join("specs/data/digits-labels.npy"));
    let labels: Vec<usize> = match &labels.values {
        aec::data::Values::I32(v) => v.iter().map(|&l| l as usize).collect(),
        aec::data::Values::F32(v) => v.iter().map(|&l| l as usize).collect(),
    };
    let mut means = vec![[0f64; 64]; 10];
    let mut counts = [0f64; 10];
    for (img, &l) in f32s(&images).chunks(64).zip(&labels) {
        counts[l] += 1.0;
        for (m, &v) in means[l].iter_mut().zip(img) {
            *m += f64::from(v) / 16.0;
        }
    }
    for (m, c) in means.iter_mut().zip(counts) {
        m.iter_mut().for_each(|v| *v /= c);
    }
    let nearest = |img: &[f32]| {
        let d = |m: &[f64; 64]| img.iter().zip(m).map(|(&a, b)| (f64::from(a) - b).powi(2)).sum::<f64>();
        (0..10).min_by(|&a, &b| d(&means[a]).total_cmp(&d(&means[b]))).unwrap_or(0)
    };
    let right = f32s(&all).chunks(64).enumerate().filter(|(i, img)| nearest(img) == i / 20).count();
    assert!(right >= 150, "{right} of 200 drawn digits are nearest their class's mean");
    // What is missing or wrong is said, not guessed.
    let on_five = |command| {
        vec![
            command,
            "specs/cvae_digits.ae",
            "--weights",
            &w,
            "--input",
            "specs/data/five.npy",
            "--output",
            "z.npy",
        ]
    };
    for (args, says) in [
        (vec!["sample", "specs/cvae_digits.ae", "--weights", &w, "--output", "x.npy"], "give the class"),
        (
            vec!["sample", "specs/cvae_digits.ae", "--weights", &w, "--output", "x.npy", "--condition", "10"],
            "classes are 0 to 9",
        ),
        (
            vec!["sample", "specs/vae_digits.ae", "--weights", &w, "--output", "x.npy", "--condition", "1"],
            "has no condition",
        ),
        (on_five("encode"), "give --condition FILE.npy"),
        (on_five("interpolate"), "`y` is a condition of this model"),
    ] {
        let (code, _, err) = aec(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
