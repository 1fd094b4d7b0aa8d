//! Bad GGUF input: every case is a typed error naming the file and the key / tensor / field
//! with the expected and found values; never a panic, a hang or an allocation sized by an
//! unchecked number from the file (a count of 10^12 entries would abort the process if it
//! were allocated before being checked).

use super::common;

use std::path::PathBuf;

use super::common::gguf_writer;

use common::{TempDir, B};
use gguf_writer::{parts, put_str, write_gguf, T};
use legora_hub::gguf::{GgufFile, MetadataArray, MetadataValue};
use legora_hub::{HubError, PretrainedModel};
use legora_kernels::quant::ggml::GgmlType;

fn fixture(stem: &str) -> PathBuf {
    gguf_writer::fixture(stem)
}

fn set(meta: &mut Vec<(String, MetadataValue)>, key: &str, v: Option<MetadataValue>) {
    meta.retain(|(k, _)| k != key);
    if let Some(v) = v {
        meta.push((key.into(), v));
    }
}

fn save(tmp: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = tmp.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open_err(tmp: &TempDir, bytes: &[u8]) -> HubError {
    let p = save(tmp, "bad.gguf", bytes);
    match GgufFile::open(&p) {
        Ok(_) => panic!("a malformed file opened"),
        Err(e) => {
            assert!(
                e.to_string().contains("bad.gguf"),
                "the error names the file: {e}"
            );
            e
        }
    }
}

fn load_err(tmp: &TempDir, bytes: &[u8]) -> HubError {
    let p = save(tmp, "bad.gguf", bytes);
    match PretrainedModel::<B>::from_pretrained(&p, &Default::default()) {
        Ok(_) => panic!("a bad file loaded"),
        Err(e) => e,
    }
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

// ---- tests --------------------------------------------------------------------------------

#[test]
fn every_value_type_round_trips_including_nested_arrays() {
    let tmp = TempDir::new("gguf-values");
    let meta: Vec<(String, MetadataValue)> = vec![
        ("u8".into(), MetadataValue::U8(7)),
        ("i8".into(), MetadataValue::I8(-7)),
        ("u16".into(), MetadataValue::U16(65535)),
        ("i16".into(), MetadataValue::I16(-300)),
        ("u32".into(), MetadataValue::U32(1 << 31)),
        ("i32".into(), MetadataValue::I32(-5)),
        ("f32".into(), MetadataValue::F32(0.5)),
        ("bool".into(), MetadataValue::Bool(true)),
        ("str".into(), MetadataValue::String("héllo".into())),
        ("u64".into(), MetadataValue::U64(u64::MAX)),
        ("i64".into(), MetadataValue::I64(i64::MIN)),
        ("f64".into(), MetadataValue::F64(-2.25)),
        ("general.alignment".into(), MetadataValue::U32(64)),
        (
            "nested".into(),
            MetadataValue::Array(MetadataArray::Array(vec![
                MetadataArray::I32(vec![1, -2]),
                MetadataArray::String(vec!["a".into(), String::new()]),
                MetadataArray::Array(vec![MetadataArray::F64(vec![1.5])]),
                MetadataArray::Bool(vec![]),
            ])),
        ),
    ];
    let p = save(&tmp, "values.gguf", &write_gguf(&meta, &[]));
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.metadata(), &meta[..]);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.get_u64("u16").unwrap(), Some(65535));
    assert_eq!(f.get_f64("f32").unwrap(), Some(0.5));
    let e = f.get_u64("i8").unwrap_err();
    assert!(
        e.to_string().contains("`i8`") && e.to_string().contains("INT8 -7"),
        "{e}"
    );
}

#[test]
fn bad_magic_version_and_big_endian() {
    let tmp = TempDir::new("gguf-header");
    let mut b = header(0, 0);
    b[..4].copy_from_slice(b"GGML");
    let e = open_err(&tmp, &b);
    assert!(
        matches!(&e, HubError::GgufFormat { what, .. } if what == "magic"),
        "{e}"
    );
    for (version, needle) in [
        (1u32, "v1"),
        (7, "found 7"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = header(0, 0);
        b[4..8].copy_from_slice(&version.to_le_bytes());
        let e = open_err(&tmp, &b);
        assert!(
            e.to_string().contains("version") && e.to_string().contains(needle),
            "{e}"
        );
    }
}

#[test]
fn truncated_files_are_typed_errors_at_every_cut() {
    let tmp = TempDir::new("gguf-trunc");
    let full = std::fs::read(fixture("qwen2-q4_0")).unwrap();
    let mut cuts: Vec<usize> = (0..full.len()).step_by(997).collect();
    cuts.extend([5, 23, 24, 25, full.len() - 1]);
    for cut in cuts {
        let e = open_err(&tmp, &full[..cut]);
        assert!(
            matches!(
                e,
                HubError::GgufFormat { .. }
                    | HubError::GgufTensor { .. }
                    | HubError::GgufMetadata { .. }
            ),
            "cut at {cut}: {e}"
        );
    }
    // Cut inside the data: the last tensor's bytes run past the end of the file.
    let e = open_err(&tmp, &full[..full.len() - 1]);
    assert!(
        matches!(&e, HubError::GgufTensor { tensor, .. } if tensor == "output_norm.weight"),
        "{e}"
    );
}

#[test]
fn tensor_data_past_the_end_misaligned_or_overlapping() {
    let tmp = TempDir::new("gguf-offsets");
    let t = |name: &str, offset: Option<u64>| T {
        name: name.into(),
        dims: vec![8],
        ty: GgmlType::F32.id(),
        data: vec![0; 32],
        offset,
    };
    let e = open_err(
        &tmp,
        &write_gguf(&[], &[t("a", None), t("far", Some(1 << 40))]),
    );
    assert!(
        matches!(&e, HubError::GgufTensor { tensor, expected, .. } if tensor == "far" && expected.contains("inside the file")),
        "{e}"
    );
    let e = open_err(&tmp, &write_gguf(&[], &[t("odd", Some(8))]));
    assert!(
        matches!(&e, HubError::GgufTensor { tensor, expected, found, .. }
            if tensor == "odd" && expected.contains("alignment 32") && found.contains('8')),
        "{e}"
    );
    // offset u64::MAX: the end overflows; still a typed error
    let e = open_err(&tmp, &write_gguf(&[], &[t("wrap", Some(u64::MAX - 31))]));
    assert!(
        matches!(&e, HubError::GgufTensor { tensor, .. } if tensor == "wrap"),
        "{e}"
    );
    let e = open_err(&tmp, &write_gguf(&[], &[t("a", None), t("b", Some(0))]));
    assert!(
        matches!(&e, HubError::GgufTensor { expected, .. } if expected.contains("the end of `")),
        "{e}"
    );
    let e = open_err(&tmp, &write_gguf(&[], &[t("same", None), t("same", None)]));
    assert!(
        matches!(&e, HubError::GgufTensor { expected, .. } if expected.contains("unique")),
        "{e}"
    );
}

#[test]
fn unknown_type_bad_dims_and_partial_blocks() {
    let tmp = TempDir::new("gguf-types");
    let t = |ty: u32, dims: Vec<u64>| T {
        name: "w".into(),
        dims,
        ty,
        data: vec![0; 64],
        offset: None,
    };
    let e = open_err(&tmp, &write_gguf(&[], &[t(99, vec![16])]));
    assert!(
        matches!(&e, HubError::GgufTensor { tensor, found, .. } if tensor == "w" && found.contains("99")),
        "{e}"
    );
    let e = open_err(
        &tmp,
        &write_gguf(&[], &[t(GgmlType::Q4_0.id(), vec![20, 2])]),
    );
    assert!(
        e.to_string().contains("multiple of 32") && e.to_string().contains("ne0 = 20"),
        "{e}"
    );
    let e = open_err(&tmp, &write_gguf(&[], &[t(0, vec![1; 5])]));
    assert!(e.to_string().contains("at most 4 dimensions"), "{e}");
    let e = open_err(&tmp, &write_gguf(&[], &[t(0, vec![1 << 32, 1 << 32])]));
    assert!(e.to_string().contains("fits in 63 bits"), "{e}");
    // A known type legora cannot decode opens fine (its blocks are readable) and fails on
    // dequantization, naming the tensor.
    let mut iq = t(GgmlType::IQ2_XXS.id(), vec![256]);
    iq.data = vec![0; 66];
    let p = save(&tmp, "iq.gguf", &write_gguf(&[], &[iq]));
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.tensor("w").unwrap().data.len(), 66);
    let e = f.dequantize("w").unwrap_err();
    assert!(
        matches!(&e, HubError::GgufTensor { tensor, found, .. } if tensor == "w" && found.contains("IQ2_XXS")),
        "{e}"
    );
}

#[test]
fn huge_counts_and_lengths_are_refused_before_allocating() {
    let tmp = TempDir::new("gguf-huge");
    let e = open_err(&tmp, &header(1_000_000_000_000, 0));
    assert!(
        matches!(&e, HubError::GgufFormat { what, found, .. } if what == "tensor_count" && found == "1000000000000"),
        "{e}"
    );
    let e = open_err(&tmp, &header(0, u64::MAX));
    assert!(
        matches!(&e, HubError::GgufFormat { what, .. } if what == "metadata_kv_count"),
        "{e}"
    );
    // a key of length 2^62
    let mut b = header(0, 1);
    b.extend((1u64 << 62).to_le_bytes());
    b.extend([b'a'; 64]);
    let e = open_err(&tmp, &b);
    assert!(
        matches!(&e, HubError::GgufFormat { what, found, .. }
            if what.contains("key of metadata entry 0") && found == &(1u64 << 62).to_string()),
        "{e}"
    );
    // a string value of length 2^62
    let mut b = header(0, 1);
    put_str(&mut b, "general.name");
    b.extend(8u32.to_le_bytes());
    b.extend((1u64 << 62).to_le_bytes());
    let e = open_err(&tmp, &b);
    assert!(e.to_string().contains("`general.name`"), "{e}");
    // an array of 2^60 u32 / of 2^60 nested arrays
    for elem in [4u32, 9] {
        let mut b = header(0, 1);
        put_str(&mut b, "tokenizer.ggml.scores");
        b.extend(9u32.to_le_bytes());
        b.extend(elem.to_le_bytes());
        b.extend((1u64 << 60).to_le_bytes());
        let e = open_err(&tmp, &b);
        assert!(
            matches!(&e, HubError::GgufMetadata { key, .. } if key == "tokenizer.ggml.scores"),
            "{e}"
        );
    }
    // arrays nested without end
    let mut b = header(0, 1);
    put_str(&mut b, "deep");
    b.extend(9u32.to_le_bytes());
    for _ in 0..1000 {
        b.extend(9u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    let e = open_err(&tmp, &b);
    assert!(e.to_string().contains("nested"), "{e}");
    // a value type that does not exist
    let mut b = header(0, 1);
    put_str(&mut b, "odd");
    b.extend(13u32.to_le_bytes());
    let e = open_err(&tmp, &b);
    assert!(
        matches!(&e, HubError::GgufMetadata { key, .. } if key == "odd"),
        "{e}"
    );
    // the same key twice
    let m = MetadataValue::U32(1);
    let e = open_err(
        &tmp,
        &write_gguf(&[("k".into(), m.clone()), ("k".into(), m)], &[]),
    );
    assert!(e.to_string().contains("duplicate"), "{e}");
}

#[test]
fn metadata_of_the_wrong_type() {
    let tmp = TempDir::new("gguf-types-meta");
    let (mut meta, tensors) = parts("qwen2-q4_0");
    set(
        &mut meta,
        "qwen2.block_count",
        Some(MetadataValue::String("two".into())),
    );
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(
        matches!(&e, HubError::GgufMetadata { key, found, .. } if key == "qwen2.block_count" && found.contains("\"two\"")),
        "{e}"
    );
    let (mut meta, tensors) = parts("qwen2-q4_0");
    set(&mut meta, "general.alignment", Some(MetadataValue::U64(32)));
    let e = open_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(
        matches!(&e, HubError::GgufMetadata { key, found, .. } if key == "general.alignment" && found == "UINT64"),
        "{e}"
    );
    let (mut meta, tensors) = parts("qwen2-q4_0");
    set(
        &mut meta,
        "general.architecture",
        Some(MetadataValue::String("gpt2".into())),
    );
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(e.to_string().contains("general.architecture"), "{e}");
    for arch in ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3"] {
        assert!(
            e.to_string().contains(&format!("\"{arch}\"")),
            "{arch}: {e}"
        );
    }
    let (mut meta, tensors) = parts("qwen2-q4_0");
    set(
        &mut meta,
        "qwen2.rope.scaling.type",
        Some(MetadataValue::String("yarn".into())),
    );
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(
        matches!(&e, HubError::GgufMetadata { key, .. } if key == "qwen2.rope.scaling.type"),
        "{e}"
    );
    // A Phi-3 file with llama.cpp's LongRoPE factors: refused naming the tensor (its
    // frequencies would otherwise be silently wrong)
    let (meta, mut tensors) = parts("phi3-f16");
    tensors.push(T {
        name: "rope_factors_long.weight".into(),
        dims: vec![4],
        ty: GgmlType::F32.id(),
        data: [1.0f32; 4].iter().flat_map(|x| x.to_le_bytes()).collect(),
        offset: None,
    });
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(
        matches!(&e, HubError::GgufTensor { tensor, .. } if tensor == "rope_factors_long.weight"),
        "{e}"
    );
    let (mut meta, tensors) = parts("qwen2-q4_0");
    set(
        &mut meta,
        "tokenizer.ggml.bos_token_id",
        Some(MetadataValue::U32(100_000)),
    );
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    // Refused by the config's own check of token ids against the vocabulary (which runs
    // before the tokenizer's) or by the GGUF key check: either way typed, naming the id.
    let text = e.to_string();
    assert!(
        matches!(&e, HubError::GgufMetadata { key, found, .. } if key == "tokenizer.ggml.bos_token_id" && found == "100000")
            || (text.contains("bos_token_id") && text.contains("100000")),
        "{e}"
    );
}

#[test]
fn missing_keys_and_tensors() {
    let tmp = TempDir::new("gguf-missing");
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.model",
        "qwen2.embedding_length",
    ] {
        let (mut meta, tensors) = parts("qwen2-q4_0");
        set(&mut meta, key, None);
        if key == "tokenizer.ggml.tokens" {
            // keep the config's vocab size known, so the tokenizer is what fails
            set(&mut meta, "qwen2.vocab_size", Some(MetadataValue::U32(340)));
        }
        let e = load_err(&tmp, &write_gguf(&meta, &tensors));
        assert!(
            matches!(&e, HubError::GgufMetadata { key: k, found, .. } if k == key && found == "no such key"),
            "{key}: {e}"
        );
    }
    // scores are how a SentencePiece vocabulary without merges orders them
    let (mut meta, tensors) = parts("llama-q4_0");
    set(&mut meta, "tokenizer.ggml.scores", None);
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(
        matches!(&e, HubError::GgufMetadata { key, .. } if key == "tokenizer.ggml.scores"),
        "{e}"
    );
    let (mut meta, tensors) = parts("llama-q4_0");
    set(
        &mut meta,
        "tokenizer.ggml.token_type",
        Some(MetadataValue::Array(MetadataArray::I32(vec![1; 3]))),
    );
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(
        e.to_string().contains("tokenizer.ggml.token_type") && e.to_string().contains("found 3"),
        "{e}"
    );

    let (meta, mut tensors) = parts("qwen2-q4_0");
    tensors.retain(|t| t.name != "blk.1.attn_v.bias");
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(
        matches!(&e, HubError::MissingTensor { tensor, .. } if tensor.contains("blk.1.attn_v.bias")),
        "{e}"
    );
    let (meta, mut tensors) = parts("qwen2-q4_0");
    let t = tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.attn_k.weight")
        .unwrap();
    assert_eq!(t.dims, [32, 16]);
    t.dims[1] = 8; // half the rows (and half the bytes)
    t.data.truncate(t.data.len() / 2);
    let e = load_err(&tmp, &write_gguf(&meta, &tensors));
    assert!(
        matches!(&e, HubError::TensorShape { tensor, expected, found, .. }
            if tensor == "blk.0.attn_k.weight" && expected == &[16, 32] && found == &[8, 32]),
        "{e}"
    );
}

#[test]
fn special_files_are_refused_without_blocking() {
    let tmp = TempDir::new("gguf-special");
    let fifo = tmp.path().join("pipe.gguf");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let e = GgufFile::open(&fifo).unwrap_err();
    assert!(
        matches!(&e, HubError::NotAFile { found, .. } if found == "a FIFO"),
        "{e}"
    );
    let e = PretrainedModel::<B>::from_pretrained(&fifo, &Default::default()).unwrap_err();
    assert!(matches!(e, HubError::NotAFile { .. }), "{e}");
    #[cfg(unix)]
    {
        let link = tmp.path().join("random.gguf");
        std::os::unix::fs::symlink("/dev/urandom", &link).unwrap();
        let e = GgufFile::open(&link).unwrap_err();
        assert!(
            matches!(&e, HubError::NotAFile { found, .. } if found == "a device"),
            "{e}"
        );
    }
    let d = tmp.path().join("folder.gguf");
    std::fs::create_dir(&d).unwrap();
    let e = GgufFile::open(&d).unwrap_err();
    assert!(
        matches!(&e, HubError::NotAFile { found, .. } if found == "a folder"),
        "{e}"
    );
    let e = GgufFile::open(tmp.path().join("absent.gguf")).unwrap_err();
    assert!(matches!(e, HubError::MissingFile { .. }), "{e}");
}
