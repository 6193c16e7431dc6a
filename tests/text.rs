//! Text in, text out: the `text` source (tokenizers, vocabularies from the training split,
//! padding), the padded cross-entropy, BLEU in the metrics, `vocab.json` in the run's save and
//! `aec translate`; and the errors of bad text files, each naming its line.

mod common;

use common::{aec, losses, s, scratch};
use std::path::Path;

/// A toy "language": each English word has one Spanish word, and the order is kept, so a small
/// model learns it in a few epochs.
fn corpus(dir: &Path, lines: usize) -> std::path::PathBuf {
    let en = ["the", "cat", "dog", "eats", "sees", "a", "red", "big", "fish", "bird"];
    let es = ["el", "gato", "perro", "come", "ve", "un", "rojo", "grande", "pez", "pájaro"];
    let mut text = String::new();
    let mut x = 7u64;
    for _ in 0..lines {
        let n = 2 + (x % 4) as usize;
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..n {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let w = ((x >> 33) % 10) as usize;
            a.push(en[w]);
            b.push(es[w]);
        }
        text.push_str(&format!("{}.\t{}.\n", a.join(" "), b.join(" ")));
    }
    let path = dir.join("pairs.tsv");
    std::fs::write(&path, text).expect("corpus");
    path
}

fn spec(dir: &Path, data: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("t.ae");
    std::fs::write(
        &path,
        format!(
            "model t {{\n input src: seq[<= 8] of token[20]\n target tgt: seq[<= 8] of token[20]\n \
             encoder {{ embed 16; gru 48 }}\n decoder {{ gru 48 teacher_forcing; dense 20 -> softmax }}\n \
             loss cross_entropy(tgt)\n}}\ntrain {{\n data text(\"{}\", tokens: word)\n batch 32\n epochs 40\n \
             optimizer adam(lr: 0.01)\n validation 0.1\n seed 2\n{extra}}}\n",
            data.display()
        ),
    )
    .expect("spec");
    path
}

#[test]
fn a_text_model_trains_saves_its_vocabularies_and_translates() {
    let dir = scratch("text-train");
    let data = corpus(&dir, 600);
    let spec = spec(&dir, &data, "");
    let run = dir.join("run");
    let (code, out, err) = aec(&["run", "--train", s(&spec), "--out", s(&run)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("BLEU"), "the progress line shows BLEU: {err}");
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let last = metrics.last().expect("epochs");
    let bleu = last["bleu"].as_f64().expect("bleu");
    assert!(bleu > 80.0, "the toy language is learnt: BLEU {bleu}\n{out}");
    assert!(last["token_accuracy"].as_f64().expect("acc") > 0.9, "{last}");
    // The vocabularies: the specials, then the words (ten, and the full stop).
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("vocab.json")).expect("vocab")).expect("json");
    assert_eq!(vocab["tokens"], "word");
    let target: Vec<&str> = vocab["columns"][1]["tokens"]
        .as_array()
        .expect("list")
        .iter()
        .map(|t| t.as_str().expect("str"))
        .collect();
    assert_eq!(&target[..4], ["<pad>", "<unk>", "<s>", "</s>"]);
    assert_eq!(target.len(), 15, "{target:?}");
    assert!(target.contains(&"pájaro") && target.contains(&"."));
    // Held-out examples are printed as sentences.
    assert!(out.contains(" → ") && out.contains('.'), "{out}");

    // A sentence on the command line (capitalized: the tokenizer lowercases), then the first 60
    // of the file with a blank line among them: translations one per line, mostly exact.
    let text = std::fs::read_to_string(&data).expect("corpus");
    let pairs: Vec<(&str, &str)> = text.lines().take(60).filter_map(|l| l.split_once('\t')).collect();
    let mut input_text: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    input_text.insert(30, "");
    let input = dir.join("in.txt");
    std::fs::write(&input, input_text.join("\n") + "\n").expect("input");
    let w = run.join("checkpoint.safetensors");
    let (code, out, err) =
        aec(&["translate", s(&spec), "--weights", s(&w), "--input", s(&input), "The Cat."]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 62, "{out}");
    assert!(lines[0].starts_with("el gato"), "{out}");
    assert_eq!(lines[31], "", "a blank line stays blank");
    let exact = lines[1..].iter().filter(|l| !l.is_empty()).zip(&pairs).filter(|(l, p)| **l == p.1).count();
    assert!(exact >= 40, "{exact} of 60 exact:\n{out}");
    // An unknown word is <unk>; a sentence too long for seq[<= 8] is an error naming it.
    let (code, _, err) = aec(&["translate", s(&spec), "--weights", s(&w), "the cat the cat the cat the cat"]);
    assert_eq!(code, 1);
    assert!(err.contains("sentence 1 has 8 tokens; the model reads at most 7"), "{err}");
    // Weights without their vocabularies: said.
    let lone = dir.join("lone");
    std::fs::create_dir_all(&lone).expect("dir");
    std::fs::copy(&w, lone.join("w.safetensors")).expect("copy");
    let (code, _, err) =
        aec(&["translate", s(&spec), "--weights", s(&lone.join("w.safetensors")), "the cat."]);
    assert_eq!(code, 1);
    assert!(err.contains("vocab.json") && err.contains("the vocabularies of the run"), "{err}");

    // `aec run` decodes ids too (a model with a target reads its input alone), up to each
    // sentence's end token, then padding.
    let ids = dir.join("ids.npy");
    let v: Vec<i32> = vec![5, 6, 3, 0, 0, 0, 0, 0, 7, 5, 8, 6, 3, 0, 0, 0];
    aec::data::write_npy(&ids, &aec::data::Array { shape: vec![2, 8], values: aec::data::Values::I32(v) })
        .expect("ids");
    let y = dir.join("y.npy");
    let (code, _, err) = aec(&["run", s(&spec), "--weights", s(&w), "--input", s(&ids), "--output", s(&y)]);
    assert_eq!(code, 0, "{err}");
    let aec::data::Values::I32(out) = aec::data::read_npy(&y).expect("y").values else { panic!("ids") };
    for row in out.chunks(8) {
        let end = row.iter().position(|&t| t == 3).expect("an end token");
        assert!(row[end + 1..].iter().all(|&t| t == 0), "{row:?}");
    }

    // Resumed mid-run: the same end, vocabularies included; and the interpreter agrees.
    let parts = dir.join("parts");
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--stop-at", "15", "--out", s(&parts)]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = aec(&["run", "--train", s(&spec), "--resume", s(&parts)]);
    assert_eq!(code, 0, "{err}");
    for f in ["checkpoint.safetensors", "vocab.json"] {
        assert!(std::fs::read(run.join(f)).ok() == std::fs::read(parts.join(f)).ok(), "{f} differs");
    }
    assert_eq!(losses(&run), losses(&parts));
}

#[test]
fn bad_text_files_are_named_with_their_line() {
    let dir = scratch("text-bad");
    for (text, want) in [
        ("a cat.\tun gato.\n\nthe dog.\tel perro.\n", "pairs.tsv:2: an empty line"),
        ("a cat.\tun gato.\nthe dog.\n", "pairs.tsv:2: no tab"),
        ("a cat.\tun gato.\ta third\n", "pairs.tsv:1: more than one tab"),
        ("a cat.\t\n", "pairs.tsv:1: an empty sentence"),
        (
            "a cat.\tun gato.\nthe big red cat sees a big red dog.\tel gato.\n",
            "pairs.tsv:2: the first sentence has 10 tokens",
        ),
    ] {
        let data = dir.join("pairs.tsv");
        std::fs::write(&data, text).expect("data");
        let spec = spec(&dir, &data, "");
        let (code, _, err) = aec(&["run", "--train", s(&spec), "--out", s(&dir.join("run"))]);
        assert_eq!(code, 1, "{text:?}: {err}");
        assert!(err.contains(want) && err.contains("t.ae:"), "{text:?}: {err}");
    }
    // Text feeds padded token sequences only: a located error at the declaration otherwise.
    let data = corpus(&dir, 20);
    let path = spec(&dir, &data, "");
    let text = std::fs::read_to_string(&path)
        .expect("spec")
        .replace("seq[<= 8] of token[20]\n target", "seq[8] of token[20]\n target");
    std::fs::write(&path, text).expect("spec");
    let (code, _, err) = aec(&["run", "--train", s(&path), "--out", s(&dir.join("run"))]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("declare `src: seq[<= N] of token[V]`"), "{err}");
}

#[test]
fn attention_learns_a_reordering_and_decodes_the_same_on_both_backends() {
    // The toy language written backwards: the decoder must look at the far end of the source
    // first, what one vector of the whole sentence serves badly and attention well.
    let dir = scratch("text-attention");
    let data = corpus(&dir, 1200);
    let text = std::fs::read_to_string(&data).expect("corpus");
    let reversed: String = text
        .lines()
        .map(|l| {
            let (a, b) = l.split_once('\t').expect("pair");
            let words: Vec<&str> = b.trim_end_matches('.').split(' ').rev().collect();
            format!("{a}\t{}.\n", words.join(" "))
        })
        .collect();
    std::fs::write(&data, reversed).expect("reversed");
    let mut bleu = Vec::new();
    for att in ["", "attention general", "attention dot", "attention additive"] {
        let path = spec(&dir, &data, "");
        let src = std::fs::read_to_string(&path)
            .expect("spec")
            .replace("teacher_forcing;", &format!("teacher_forcing; {att};"))
            .replace("epochs 40", "epochs 15");
        std::fs::write(&path, src).expect("spec");
        let run = dir.join(format!("run{}", bleu.len()));
        let (code, _, err) = aec(&["run", "--train", s(&path), "--out", s(&run)]);
        assert_eq!(code, 0, "{att}: {err}");
        let last = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
        let last: serde_json::Value =
            serde_json::from_str(last.lines().last().expect("epoch")).expect("json");
        bleu.push(last["bleu"].as_f64().expect("bleu"));
        if !att.is_empty() {
            // Greedy decoding with attention, of the file's first 30 sentences: mostly exact,
            // and the native step and the interpreter's agree.
            let w = run.join("checkpoint.safetensors");
            let corpus = std::fs::read_to_string(&data).expect("corpus");
            let pairs: Vec<(&str, &str)> =
                corpus.lines().take(30).filter_map(|l| l.split_once('\t')).collect();
            let input = dir.join("in.txt");
            std::fs::write(&input, pairs.iter().map(|p| format!("{}\n", p.0)).collect::<String>())
                .expect("input");
            let args = ["translate", s(&path), "--weights", s(&w), "--input", s(&input)];
            let (code, jit, err) = aec(&args);
            assert_eq!(code, 0, "{err}");
            let (code, interp, err) = aec(&[&args[..], &["--backend", "interp"]].concat());
            assert_eq!(code, 0, "{err}");
            assert_eq!(jit, interp);
            let exact = jit.lines().zip(&pairs).filter(|(l, p)| *l == p.1).count();
            assert!(exact >= 27, "{att}: {exact} of 30 exact:\n{jit}");
            // The weights: [sentences, target length, source length], each written row a
            // distribution over the source with nothing on its padding; and their heat maps.
            let (npy, png) = (dir.join("a.npy"), dir.join("a.png"));
            let (code, _, err) = aec(&[&args[..], &["--attention", s(&npy), "--png", s(&png)]].concat());
            assert_eq!(code, 0, "{err}");
            let a = aec::data::read_npy(&npy).expect("weights");
            assert_eq!(a.shape, [30, 8, 8]);
            let aec::data::Values::F32(w) = &a.values else { panic!("f32") };
            let first = &pairs[0].0;
            let real = first.split(' ').count() + 2; // its words, the full stop, </s>
            let row = &w[..8];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
            assert!(row[real..].iter().all(|&x| x == 0.0), "padding gets no weight: {row:?}");
            assert!(std::fs::metadata(&png).is_ok_and(|m| m.len() > 1000));
            // `aec run --attention` on ids: the same rows, a sentence of 3 ids then padding
            // and one of 7 (the longest a source with its `</s>` may be).
            let ids: Vec<i32> = [vec![5, 9, 3, 0, 0, 0, 0, 0], vec![4, 6, 8, 10, 12, 14, 3, 0]].concat();
            let (x, y, a) = (dir.join("ids.npy"), dir.join("y.npy"), dir.join("a2.npy"));
            let array = aec::data::Array { shape: vec![2, 8], values: aec::data::Values::I32(ids) };
            aec::data::write_npy(&x, &array).expect("ids");
            let ckpt = run.join("checkpoint.safetensors");
            let run_args = ["run", s(&path), "--weights", s(&ckpt), "--input", s(&x), "--output", s(&y)];
            let (code, _, err) = aec(&[&run_args[..], &["--attention", s(&a)]].concat());
            assert_eq!(code, 0, "{err}");
            let a = aec::data::read_npy(&a).expect("weights");
            assert_eq!(a.shape, [2, 8, 8]);
            let aec::data::Values::F32(w) = &a.values else { panic!("f32") };
            for (row, real) in [(&w[..8], 3), (&w[64..72], 7)] {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
                assert!(row[real..].iter().all(|&x| x == 0.0), "padding gets no weight: {row:?}");
            }
        }
    }
    assert!(bleu[1..].iter().all(|&b| b > 95.0), "attention reverses the sentences: BLEU {bleu:?}");
    assert!(bleu[0] < bleu[1], "{bleu:?}");
}

#[test]
fn beam_search_scores_at_least_greedy_and_width_one_is_greedy() {
    let dir = scratch("text-beam");
    let data = corpus(&dir, 400);
    let path = spec(&dir, &data, "");
    let src = std::fs::read_to_string(&path).expect("spec").replace("epochs 40", "epochs 6");
    std::fs::write(&path, &src).expect("spec");
    let run = dir.join("run");
    let (code, _, err) = aec(&["run", "--train", s(&path), "--out", s(&run), "--beam", "3"]);
    assert_eq!(code, 0, "{err}");
    // In-process: the trained model, the first 40 sentences as ids, greedy and beam decoding.
    let compiled = aec::compile(&src, &aec::Config { batch: Some(8) }).expect("compiles");
    let params =
        aec::runtime::checkpoint::load_params(&run.join("checkpoint.safetensors"), &compiled.forward)
            .expect("weights");
    let (arrays, _) = aec::data::text::load(
        &data,
        aec::data::text::Tokens::Word,
        1,
        &[(0, (8, 20)), (1, (8, 20))],
        (0.1, 2),
    )
    .expect("text");
    let aec::data::Values::I32(ids) = &arrays[0].values else { panic!("ids") };
    let inputs = [aec::interp::Buf::I32(ids[..40 * 8].to_vec()), aec::interp::Buf::I32(Vec::new())];
    let mut d =
        aec::runtime::decode::Decoder::new(&compiled, aec::runtime::Backend::Jit, 2).expect("decoder");
    let greedy = d.decode(&params, &inputs, 40).expect("greedy");
    assert_eq!(d.decode_beam(&params, &inputs, 40, (1, 0.6)).expect("beam 1"), greedy);
    let beam = d.decode_beam(&params, &inputs, 40, (4, 0.0)).expect("beam 4");
    let (g, b) = (
        d.score(&params, &inputs, 40, &greedy).expect("score"),
        d.score(&params, &inputs, 40, &beam).expect("score"),
    );
    for (i, (g, b)) in g.iter().zip(&b).enumerate() {
        assert!(b >= &(g - 1e-9), "sentence {i}: beam {b} below greedy {g}");
    }
    assert!(
        g.iter().zip(&b).any(|(g, b)| b > g),
        "beam search finds something better somewhere: {g:?} {b:?}"
    );
    // The same search from the command line, on the ids as an array.
    let (x, y) = (dir.join("ids.npy"), dir.join("y.npy"));
    let array =
        aec::data::Array { shape: vec![40, 8], values: aec::data::Values::I32(ids[..40 * 8].to_vec()) };
    aec::data::write_npy(&x, &array).expect("ids");
    let w = run.join("checkpoint.safetensors");
    let args = ["run", s(&path), "--weights", s(&w), "--input", s(&x), "--output", s(&y)];
    let (code, _, err) = aec(&[&args[..], &["--beam", "4", "--alpha", "0"]].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(aec::data::read_npy(&y).expect("ids").values, aec::data::Values::I32(beam));
    let (code, _, err) = aec(&[&args[..], &["--beam", "4", "--alpha", "9"]].concat());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`9` is not a number from 0 to 5"), "{err}");
    let (code, _, err) = aec(&[&args[..], &["--attention", s(&dir.join("a.npy"))]].concat());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("writes an `attention` layer's weights, and") && err.contains("has none"), "{err}");
}
