//! Models by Hugging Face repo id from the local cache, as `huggingface_hub` lays it out
//! (`models--org--name/refs/<rev>` → `snapshots/<commit>/`): resolved without a download,
//! loaded like a folder; an id the cache does not hold is an error listing every place
//! looked at.

use super::common;

use common::{fixture, TempDir, B};
use legora_hub::{resolve_model_in, HubError, PretrainedModel};
use std::path::Path;

/// A cache holding the Qwen3 fixture as `tiny-org/tiny-qwen3` at commit `c0ffee`.
fn cache() -> TempDir {
    let t = TempDir::new("hf-cache");
    let repo = t.0.join("models--tiny-org--tiny-qwen3");
    let snap = repo.join("snapshots/c0ffee");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "c0ffee\n").unwrap();
    for e in std::fs::read_dir(fixture("qwen3")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
    t
}

#[test]
fn repo_ids_resolve_to_cached_snapshots() {
    let c = cache();
    let caches = [c.0.join("elsewhere"), c.0.clone()];
    let snap = c.0.join("models--tiny-org--tiny-qwen3/snapshots/c0ffee");
    for spec in ["tiny-org/tiny-qwen3", "tiny-org/tiny-qwen3@c0ffee"] {
        assert_eq!(resolve_model_in(Path::new(spec), &caches).unwrap(), snap);
    }
    // an existing path wins, whatever it looks like
    let here = fixture("qwen3");
    assert_eq!(resolve_model_in(&here, &caches).unwrap(), here);
    // the snapshot loads as the folder does
    let a = PretrainedModel::<B>::from_pretrained(&snap, &Default::default()).unwrap();
    let b = PretrainedModel::<B>::from_pretrained(&here, &Default::default()).unwrap();
    assert_eq!(a.model.config(), b.model.config());
}

#[test]
fn an_uncached_repo_id_lists_where_it_looked() {
    let c = cache();
    for spec in ["tiny-org/absent", "tiny-org/tiny-qwen3@v9"] {
        let err = resolve_model_in(Path::new(spec), std::slice::from_ref(&c.0)).unwrap_err();
        assert!(matches!(err, HubError::ModelNotFound { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(spec) && msg.contains("nothing is downloaded"),
            "{msg}"
        );
        assert!(msg.contains(&c.0.display().to_string()), "{msg}");
    }
    // what cannot be a repo id stays a path: loading it names the missing file
    for spec in ["no/such/path", "/abs/absent"] {
        let got = resolve_model_in(Path::new(spec), std::slice::from_ref(&c.0)).unwrap();
        assert_eq!(got, Path::new(spec));
        let err = PretrainedModel::<B>::from_pretrained(spec, &Default::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
