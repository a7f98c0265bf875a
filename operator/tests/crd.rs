//! The CRD artifacts: the checked-in YAML is exactly what the Rust types generate, and
//! the CEL rules accept the sample clusters and refuse bad specs and bad updates with the
//! documented messages (evaluated offline, as the API server would).

use std::path::{Path, PathBuf};

use parley_operator::crd::ParleyCluster;

fn repo() -> PathBuf {
    // The value cargo and nextest set when running the test follows this checkout even
    // when the binary was built from another one sharing the target directory.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

fn load(path: &Path) -> ParleyCluster {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

#[test]
fn checked_in_crds_match_the_rust_types() {
    let generated = parley_operator::crd_yaml().expect("CRD serializes");
    for file in [
        "crds/parleyclusters.parley.io.yaml",
        "charts/parley/crds/parleyclusters.parley.io.yaml",
    ] {
        let on_disk = std::fs::read_to_string(repo().join(file)).expect("CRD file exists");
        assert!(
            on_disk == generated,
            "{file} is stale: regenerate it with \
             `cargo run -p parley-operator -- crd > {file}`"
        );
    }
}

#[test]
fn sample_clusters_pass_schema_and_cel() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("examples")).expect("examples/") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let pc = load(&path);
            pc.validate_cel()
                .unwrap_or_else(|e| panic!("{path:?} refused: {e:?}"));
            n += 1;
        }
    }
    assert!(n >= 2, "the sample clusters were found");
}

#[test]
fn bad_specs_are_refused_with_their_message() {
    let dir = repo().join("operator/tests/samples/bad");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("bad samples") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{path:?} has no '# expect:' line"));
        let pc: ParleyCluster = serde_yaml::from_str(&text).expect("parses");
        let err = pc
            .validate_cel()
            .expect_err(&format!("{path:?} must be refused"));
        let shown = format!("{err:?}");
        assert!(
            shown.contains(expect),
            "{path:?}: expected {expect:?}, got {shown}"
        );
        n += 1;
    }
    assert!(n >= 5);
}

#[test]
fn immutable_and_grow_only_fields_are_enforced_on_update() {
    let old = load(&repo().join("examples/parleycluster-zones.yaml"));
    let refused = |change: &dyn Fn(&mut ParleyCluster), expect: &str| {
        let mut new = old.clone();
        change(&mut new);
        let err = new
            .validate_cel_update(&old)
            .expect_err(&format!("update must be refused: {expect}"));
        assert!(format!("{err:?}").contains(expect), "{expect}: {err:?}");
    };
    refused(
        &|pc| pc.spec.storage.size = "100Gi".into(),
        "storage size may grow but never shrink",
    );
    refused(&|pc| pc.spec.shard_groups = 512, "shardGroups is immutable");
    refused(
        &|pc| pc.spec.storage.storage_class_name = Some("slow".into()),
        "storageClassName is immutable",
    );
    refused(
        &|pc| pc.spec.storage.storage_class_name = None,
        "storageClassName is immutable",
    );
    // Growing storage, scaling and upgrading are fine.
    let mut grown = old.clone();
    grown.spec.storage.size = "1Ti".into();
    grown.spec.nodes = 9;
    grown.spec.version = "0.2.0".into();
    grown
        .validate_cel_update(&old)
        .expect("grow, scale and upgrade are allowed");
}
