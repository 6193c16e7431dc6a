//! ONNX export in CI (Rust only): every shipped spec exports every part it has, the files parse
//! back, and their structure holds — every node's inputs defined before it, initializers named,
//! shaped and valued as the parameters exported, an opset declared; and through the binary, a
//! written file's initializers are the checkpoint file's tensors byte for byte. `tests/onnx/check_onnx.py` runs
//! them in onnxruntime against aec (outside CI).

mod common;
use aec::onnx::{self, Export, proto};
use common::{aec, s, scratch};
use prost::Message;

fn parts(m: &aec::sema::Model) -> Vec<Export> {
    use aec::syntax::ast::LayerKind;
    let forced = m.decoder().any(|l| matches!(&l.layer.kind, LayerKind::Recurrent(r) if r.teacher_forcing));
    // A decoder that unpools or links to the encoder reads more than the code.
    let unpools =
        m.decoder().any(|l| matches!(l.layer.kind, LayerKind::Unpool { .. } | LayerKind::Link { .. }));
    let mut parts = vec![Export::Encoder];
    if forced {
        parts.push(Export::Step);
    } else {
        parts.push(Export::Model);
        if !unpools {
            parts.push(Export::Decoder);
        }
    }
    parts
}

#[test]
fn every_shipped_spec_exports_every_part_it_has() {
    for name in common::shipped_specs() {
        let src = std::fs::read_to_string(common::root().join(format!("specs/{name}.ae"))).expect("spec");
        let compiled = aec::compile(&src, &aec::Config { batch: Some(1) }).expect("compiles");
        let params = aec::runtime::init::init_params(&compiled.forward, aec::syntax::ast::Init::Default, 1);
        for part in parts(&compiled.model) {
            for opset in [*onnx::OPSETS.start(), onnx::DEFAULT_OPSET, *onnx::OPSETS.end()] {
                let what = format!("{name} {part:?} opset {opset}");
                let model = onnx::export(&compiled.model, &params, part, opset)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let bytes = model.encode_to_vec();
                let back =
                    proto::ModelProto::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(back, model, "{what}: does not read back as written");
                assert_eq!(onnx::verify(&back), Vec::<String>::new(), "{what}");
                assert_eq!(back.opset_import[0].version, Some(opset), "{what}");
                let g = back.graph.expect("graph");
                assert!(!g.node.is_empty() || g.initializer.is_empty(), "{what}: no nodes");
                for t in &g.initializer {
                    let name = t.name.as_deref().expect("a name");
                    let p = compiled.model.params.iter().position(|p| p.name == name);
                    let p =
                        p.unwrap_or_else(|| panic!("{what}: initializer {name} is not a checkpoint tensor"));
                    let dims: Vec<i64> = compiled.model.params[p].shape.iter().map(|&d| d as i64).collect();
                    assert_eq!(t.dims, dims, "{what}: {name}");
                    let raw = t.raw_data.as_ref().expect("raw data");
                    let values: Vec<f32> =
                        raw.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    assert_eq!(values, params[p], "{what}: {name}'s values");
                }
                let outputs: Vec<&str> = g.output.iter().filter_map(|o| o.name.as_deref()).collect();
                let want: &[&str] = match part {
                    Export::Model => &["recon", "code"],
                    Export::Encoder => &["code"],
                    Export::Decoder => &["recon"],
                    Export::Step => &["recon", "state_after"],
                };
                assert!(want.iter().all(|w| outputs.contains(w)), "{what}: outputs {outputs:?}");
                // The batch is dynamic.
                let first = &g.input[0];
                let Some(proto::TypeProto { value: Some(proto::type_proto::Value::TensorType(t)) }) =
                    &first.r#type
                else {
                    panic!("{what}: input without a tensor type");
                };
                let dim = &t.shape.as_ref().expect("shape").dim[0];
                assert_eq!(
                    dim.value,
                    Some(proto::tensor_shape_proto::dimension::Value::DimParam("batch".into())),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn aec_export_writes_a_file_and_refuses_what_it_cannot_write() {
    let dir = scratch("onnx-export");
    let run = dir.join("run");
    let (code, _, err) = aec(&["run", "--train", "specs/digits_conv.ae", "--epochs", "1", "--out", s(&run)]);
    assert_eq!(code, 0, "{err}");
    let w = run.join("checkpoint.safetensors");
    let out = dir.join("m.onnx");
    let (code, _, err) = aec(&["export", "specs/digits_conv.ae", "--weights", s(&w), "--onnx", s(&out)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("inputs x → outputs recon, code"), "{err}");
    let model = proto::ModelProto::decode(std::fs::read(&out).expect("written").as_slice()).expect("parses");
    assert!(onnx::verify(&model).is_empty());
    // The initializers are the checkpoint file's tensors, byte for byte, and all of them.
    let checkpoint = std::fs::read(&w).expect("checkpoint");
    let st = safetensors::SafeTensors::deserialize(&checkpoint).expect("safetensors");
    let inits = &model.graph.as_ref().expect("graph").initializer;
    assert_eq!(inits.len(), st.names().len(), "one initializer per checkpoint tensor");
    for t in inits {
        let name = t.name.as_deref().expect("a name");
        let saved = st.tensor(name).unwrap_or_else(|_| panic!("{name} is not in the checkpoint"));
        let dims: Vec<i64> = saved.shape().iter().map(|&d| d as i64).collect();
        assert_eq!(t.dims, dims, "{name}");
        assert_eq!(t.raw_data.as_deref(), Some(saved.data()), "{name}'s bytes");
    }
    let ops: Vec<&str> =
        model.graph.as_ref().expect("graph").node.iter().filter_map(|n| n.op_type.as_deref()).collect();
    for op in ["Conv", "MaxPool", "MaxUnpool", "ConvTranspose", "Relu", "Sigmoid"] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    let cases: [(&[&str], i32, &str); 4] = [
        (&["--part", "decoder"], 1, "switches"),
        (&["--part", "step"], 1, "teacher-forced"),
        (&["--opset", "9"], 2, "opsets 14 to 21"),
        (&["--onnx", "no/such/dir/m.onnx"], 2, "does not exist"),
    ];
    for (extra, want, says) in cases {
        let mut args = vec!["export", "specs/digits_conv.ae", "--weights", s(&w)];
        if !extra.contains(&"--onnx") {
            args.extend(["--onnx", s(&out)]);
        }
        args.extend_from_slice(extra);
        let (code, _, err) = aec(&args);
        assert_eq!(code, want, "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}
