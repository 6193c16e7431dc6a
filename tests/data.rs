//! Data at any size: image folders (decoded once into a cache), `.npy` files read a batch at a
//! time in their stored dtype, and batches gathered by a second thread.

mod common;

use aec::data::images::{self, Fit};
use aec::data::stored::Stored;
use aec::data::{Values, npy};
use common::{aec_env, s, scratch};
use std::path::{Path, PathBuf};

/// An RGB test picture of `w × h` with a pattern that differs per `seed`.
fn picture(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7 + seed * 31) as u8, (y * 5 + seed * 17) as u8, ((x + y) * 3 + seed) as u8])
    })
}

fn spec(dir: &Path, data: &str, shape: &str, extra: &str) -> PathBuf {
    let path = dir.join("t.ae");
    let dims: Vec<usize> = shape
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|d| d.trim().parse().expect("dim"))
        .collect();
    // Pictures through convolutions, vectors through dense layers.
    let (enc, dec) = match dims[..] {
        [c, _, _] => ("conv 4 k3 p1 -> tanh".to_owned(), format!("conv {c} k3 p1 -> sigmoid")),
        _ => ("dense 6 -> tanh".to_owned(), format!("dense {} -> sigmoid", dims.iter().product::<usize>())),
    };
    std::fs::write(
        &path,
        format!(
            "model t {{\n input x: {shape}\n encoder {{ {enc} }}\n decoder {{ {dec} }}\n \
             loss mse(x)\n}}\ntrain {{\n data {data}\n batch 4\n epochs 3\n optimizer adam(lr: 0.01)\n seed 3\n{extra}}}\n"
        ),
    )
    .expect("spec");
    path
}

fn train(dir: &Path, spec: &Path, run: &str, env: &[(&str, &str)]) -> (i32, String, Vec<u8>) {
    let out = dir.join(run);
    let cache = dir.join("cache");
    let mut env = env.to_vec();
    env.push(("AEC_CACHE_DIR", s(&cache)));
    let (code, _, err) = aec_env(&["run", "--train", s(spec), "--out", s(&out)], &env);
    let weights = std::fs::read(out.join("checkpoint.safetensors")).unwrap_or_default();
    (code, err, weights)
}

/// The `.npy` bytes of a `u8` array.
fn npy_u8(shape: &[usize], values: &[u8]) -> Vec<u8> {
    let mut b = npy::header_bytes("|u1", shape, 0);
    b.extend_from_slice(values);
    b
}

#[test]
fn an_image_folder_trains_as_the_same_images_given_as_an_npy() {
    let dir = scratch("data-images-npy");
    let photos = dir.join("photos");
    // Two labels (sub-folders), mixed sizes, PNG and JPEG.
    for (i, (w, h)) in [(20, 12), (16, 16), (9, 30), (40, 25), (16, 17)].into_iter().enumerate() {
        let sub = photos.join(if i % 2 == 0 { "a" } else { "b" });
        std::fs::create_dir_all(&sub).expect("folder");
        picture(w, h, i as u32).save(sub.join(format!("{i}.png"))).expect("png");
    }
    let path = spec(&dir, "images(\"photos/\", fit: stretch)", "[3, 8, 8]", "");
    let (code, err, from_images) = train(&dir, &path, "run-images", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("decoded 5 images of"), "{err}");
    // The same images decoded here with the same crate: stretched to 8 × 8 with a triangle
    // filter, channel-major, in path order (a/0, a/2, a/4, b/1, b/3).
    let mut values = Vec::new();
    for i in [0, 2, 4, 1, 3] {
        let sub = if i % 2 == 0 { "a" } else { "b" };
        let img = image::open(photos.join(sub).join(format!("{i}.png"))).expect("decode");
        let rgb = img.resize_exact(8, 8, image::imageops::FilterType::Triangle).to_rgb8();
        for ch in 0..3 {
            values.extend(rgb.as_raw().chunks_exact(3).map(|p| p[ch]));
        }
    }
    std::fs::write(dir.join("x.npy"), npy_u8(&[5, 3, 8, 8], &values)).expect("npy");
    let path = spec(&dir, "npy(\"x.npy\", scale: 1/255)", "[3, 8, 8]", "");
    let (code, err, from_npy) = train(&dir, &path, "run-npy", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !from_npy.is_empty() && from_images == from_npy,
        "the same training from the folder and the .npy"
    );
    // `aec encode` on the folder: the codes, and the labels beside them.
    let spec_images = spec(&dir, "images(\"photos/\", fit: stretch)", "[3, 8, 8]", "");
    let (z, weights) = (dir.join("z.npy"), dir.join("run-images/checkpoint.safetensors"));
    let args =
        ["encode", s(&spec_images), "--weights", s(&weights), "--input", s(&photos), "--output", s(&z)];
    let (code, _, err) = aec_env(&args, &[("AEC_CACHE_DIR", s(&dir.join("cache")))]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(aec::data::read_npy(&z).expect("codes").shape, [5, 4, 8, 8]);
    let labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("z.labels.json")).expect("labels"))
            .expect("json");
    assert_eq!(labels["classes"], serde_json::json!(["a", "b"]));
    assert_eq!(labels["labels"], serde_json::json!([0, 0, 0, 1, 1]));
    assert_eq!(labels["files"][3], "b/1.png");
    // The labels: the sub-folder of each file, in the cache's listing.
    let decoded = images::load(&photos, [3, 8, 8], Fit::Stretch, (&dir.join("cache"), 2)).expect("cached");
    assert!(!decoded.decoded, "the second load finds the cache");
    assert_eq!(decoded.listing.classes, ["a", "b"]);
    assert_eq!(decoded.listing.labels, [0, 0, 0, 1, 1]);
}

#[test]
fn odd_image_files_are_decoded_skipped_or_refused_clearly() {
    let dir = scratch("data-images-odd");
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).expect("folder");
    let cache = dir.join("cache");
    let load = |shape: [usize; 3]| images::load(&photos, shape, Fit::Crop, (&cache, 2));
    // An empty folder (a text file is not an image).
    std::fs::write(photos.join("notes.txt"), "not a picture").expect("txt");
    let e = load([3, 8, 8]).err().expect("empty").to_string();
    assert!(e.contains("holds no PNG or JPEG files"), "{e}");
    // One image: a PNG with alpha, a 16-bit PNG and a grey JPEG into an RGB spec, a corrupt JPEG.
    image::RgbaImage::from_fn(10, 6, |x, _| image::Rgba([200, 100, x as u8 * 20, 0]))
        .save(photos.join("alpha.png"))
        .expect("rgba");
    let e = load([3, 8, 8]).expect("one image");
    assert_eq!((e.listing.files.len(), e.decoded), (1, true));
    image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(12, 9, |x, y| {
        image::Rgb([x as u16 * 5000, y as u16 * 7000, 65535])
    })
    .save(photos.join("deep.png"))
    .expect("16-bit");
    image::GrayImage::from_fn(31, 17, |x, y| image::Luma([(x * 8 + y) as u8]))
        .save(photos.join("grey.jpg"))
        .expect("jpeg");
    std::fs::write(photos.join("broken.jpg"), b"\xff\xd8\xff\xe0 this is not a JPEG").expect("corrupt");
    // The folder changed: decoded again, the broken file skipped and named.
    let e = load([3, 8, 8]).expect("mixed");
    assert!(e.decoded, "a changed folder is decoded again");
    assert_eq!(e.listing.files, ["alpha.png", "deep.png", "grey.jpg"]);
    assert_eq!(e.listing.skipped.len(), 1);
    assert_eq!(e.listing.skipped[0].0, "broken.jpg");
    let stored = Stored::open(&e.cache, 1.0).expect("cache").expect("u8");
    let Values::F32(v) = stored.gather(&[0, 1, 2]).expect("samples") else { panic!("f32") };
    // Alpha is dropped (the colour stays); 16-bit blue 65535 is 255; grey has equal channels.
    assert_eq!(v[192 + 2 * 64], 255.0, "16-bit full blue");
    let grey = &v[2 * 192..3 * 192];
    assert_eq!(&grey[..64], &grey[64..128]);
    assert_eq!(&grey[..64], &grey[128..]);
    assert!(v[..64].iter().all(|&r| r == 200.0), "alpha.png's red channel");
    // Into a grey spec: one channel.
    assert_eq!(
        Stored::open(&load([1, 8, 8]).expect("grey").cache, 1.0).expect("cache").expect("u8").shape,
        [3, 1, 8, 8]
    );
    // The same listing again: the cache, not a decode.
    assert!(!load([3, 8, 8]).expect("cached").decoded);
    // Only unreadable files: an error that names one.
    for f in ["alpha.png", "deep.png", "grey.jpg"] {
        std::fs::remove_file(photos.join(f)).expect("rm");
    }
    let e = load([3, 8, 8]).err().expect("none readable").to_string();
    assert!(e.contains("no image under") && e.contains("broken.jpg"), "{e}");
    // From the command line, a corrupt file among good ones is a warning with a count.
    picture(8, 8, 1).save(photos.join("good.png")).expect("png");
    let path = spec(&dir, "images(\"photos/\")", "[3, 8, 8]", "");
    let (code, err, _) = train(&dir, &path, "run", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: skipped") && err.contains("broken.jpg"), "{err}");
    assert!(err.contains("1 of 2 image files could not be read"), "{err}");
    // A spec whose input is not a picture: a located error before anything is read.
    let path = spec(&dir, "images(\"photos/\")", "[2, 8, 8]", "");
    let (code, _, err) = aec_env(&["compile", s(&path)], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("`images` gives pictures of [channels, height, width]"), "{err}");
}

#[test]
fn stored_npy_files_train_exactly_as_in_memory_in_every_dtype() {
    let dir = scratch("data-stored");
    let n = 13;
    let raw: Vec<u8> = (0..n * 12).map(|i| (i * 37 % 256) as u8).collect();
    let files: [(&str, Vec<u8>); 4] = [
        ("u8", npy_u8(&[n, 12], &raw)),
        ("u16", {
            let mut b = npy::header_bytes("<u2", &[n, 12], 0);
            raw.iter().for_each(|&x| b.extend_from_slice(&(u16::from(x) * 200).to_le_bytes()));
            b
        }),
        ("f16", {
            let mut b = npy::header_bytes("<f2", &[n, 12], 0);
            raw.iter()
                .for_each(|&x| b.extend_from_slice(&half::f16::from_f32(f32::from(x) / 255.0).to_le_bytes()));
            b
        }),
        ("f32", {
            let mut b = npy::header_bytes("<f4", &[n, 12], 0);
            raw.iter().for_each(|&x| b.extend_from_slice(&(f32::from(x) / 255.0).to_le_bytes()));
            b
        }),
    ];
    for (name, bytes) in files {
        std::fs::write(dir.join(format!("{name}.npy")), bytes).expect("npy");
        let scale = match name {
            "u8" => "1/255",
            "u16" => "1/51000",
            _ => "1",
        };
        // Validation, noise, and a last batch of one: every path the data takes.
        let path = spec(
            &dir,
            &format!("npy(\"{name}.npy\", scale: {scale})"),
            "[12]",
            "validation 0.2\n noise gaussian(0.1)\n",
        );
        let (code, err, stored) = train(&dir, &path, &format!("{name}-stored"), &[]);
        assert_eq!(code, 0, "{name}: {err}");
        let (code, err, memory) = train(&dir, &path, &format!("{name}-memory"), &[("AEC_DATA", "memory")]);
        assert_eq!(code, 0, "{name}: {err}");
        assert!(stored == memory, "{name}: stored and in-memory training differ");
        let metrics =
            std::fs::read_to_string(dir.join(format!("{name}-stored/metrics.jsonl"))).expect("metrics");
        assert!(metrics.contains("\"data_wait_s\":"), "{metrics}");
    }
    // Patches of a stored file's images, cut as they are read: the same training as the
    // patches of the file read whole.
    let pixels: Vec<u8> = (0..2 * 20 * 23).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(dir.join("images.npy"), npy_u8(&[2, 20, 23], &pixels)).expect("npy");
    let path = spec(
        &dir,
        "patches(npy(\"images.npy\", scale: 1/255), size: 8, stride: 5)",
        "[1, 8, 8]",
        "validation 0.25\n",
    );
    let (code, err, stored) = train(&dir, &path, "patches-stored", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("training on 18 samples (6 for validation)"), "2 images × 3 × 4 patches: {err}");
    let (code, err, memory) = train(&dir, &path, "patches-memory", &[("AEC_DATA", "memory")]);
    assert_eq!(code, 0, "{err}");
    assert!(stored == memory, "patches: stored and in-memory training differ");
    // A NaN in a stored float file: named with its sample before training.
    let mut b = npy::header_bytes("<f4", &[3, 12], 0);
    (0..36).for_each(|i| b.extend_from_slice(&(if i == 29 { f32::NAN } else { 0.5f32 }).to_le_bytes()));
    std::fs::write(dir.join("nan.npy"), b).expect("npy");
    let path = spec(&dir, "npy(\"nan.npy\")", "[12]", "");
    let (code, err, _) = train(&dir, &path, "nan", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nan.npy contains NaN or infinity (sample 2, value 5)"), "{err}");
}

#[test]
fn a_stored_file_truncated_while_training_reads_it_is_an_error_not_a_crash() {
    let dir = scratch("data-truncated");
    let path = dir.join("x.npy");
    std::fs::write(&path, npy_u8(&[100, 64], &[7; 6400])).expect("npy");
    let stored = Stored::open(&path, 1.0).expect("open").expect("u8");
    assert!(stored.gather(&[99, 0]).is_ok());
    let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len(1000).expect("truncate");
    let e = stored.gather(&[99]).expect_err("truncated").to_string();
    assert!(e.contains("was truncated while training read it"), "{e}");
    // Opened after: the header's shape against the length.
    let e = Stored::open(&path, 1.0).expect_err("short").to_string();
    assert!(e.contains("the file is truncated"), "{e}");
}

#[test]
fn an_npy_larger_than_the_memory_limit_trains() {
    // 600 MB of u8 samples (a sparse file: zeros), under a 256 MB budget.
    let dir = scratch("data-large");
    let (n, per) = (48_828usize, 12_288usize);
    let path = dir.join("big.npy");
    let header = npy::header_bytes("|u1", &[n, 3, 64, 64], 0);
    std::fs::write(&path, &header).expect("header");
    let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len((header.len() + n * per) as u64).expect("600 MB");
    drop(f);
    let spec = dir.join("big.ae");
    std::fs::write(
        &spec,
        "model big {\n input x: [3, 64, 64]\n encoder { conv 2 k4 s4 -> relu }\n decoder { deconv 3 k4 s4 -> sigmoid }\n \
         loss mse(x)\n}\ntrain {\n data npy(\"big.npy\", scale: 1/255)\n batch 512\n epochs 1\n seed 1\n}\n",
    )
    .expect("spec");
    let out = dir.join("run");
    let args = ["--memory-limit", "256M", "run", "--train", s(&spec), "--out", s(&out)];
    let (code, _, err) = aec_env(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("training on {n} samples")), "{err}");
    // Read whole, the same file does not fit.
    let (code, _, err) = aec_env(&args, &[("AEC_DATA", "memory")]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("memory"), "{err}");
}
