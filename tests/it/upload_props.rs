//! Property tests of the upload module: whatever the bytes, no panic, and nothing is ever
//! written outside the work directory.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use neops_remote_lab::lab::upload::{self, Limits};
use proptest::prelude::*;

use crate::common::Form;

const BOUNDARY: &str = "pRoPbOuNdArY";

/// Every file under `dir`, as paths relative to it.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

fn run(body: &[u8]) {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("labs/w");
    let limits = Limits {
        max_bytes: 64 * 1024,
        max_parts: 16,
    };
    let cancel = AtomicBool::new(false);
    let result = upload::receive(body, BOUNDARY, &limits, &work, &cancel);
    // Everything on disk is inside the work dir.
    for f in files(root.path()) {
        assert!(
            f.starts_with("labs/w"),
            "{f:?} written outside the work dir"
        );
    }
    if let Ok(upload) = result {
        assert!(upload.topology.starts_with(&work));
        assert!(upload.topology.is_file());
        for extra in upload.extra_files {
            assert!(work.join(&extra).starts_with(&work));
            assert!(work.join(&extra).is_file());
        }
    }
}

fn form() -> Form {
    Form::new().with_boundary(BOUNDARY)
}

fn name_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        "[a-z./\\\\]{0,20}".prop_map(|s| s.into_bytes()),
        proptest::sample::select(vec![
            "../x",
            "/etc/passwd",
            "a/../../b",
            "..",
            ".",
            "a//b",
            "t.yml",
            "c/./d",
            "\u{0}x",
            "configs/r1.cfg",
            "..\\..\\x",
            "x/",
            "-rf.yml",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_or_escape(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        run(&body);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_start(tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut body = form().raw_file("topology", b"t.yml", b"nodes: [r1]\n").parts();
        body.extend_from_slice(&tail);
        run(&body);
    }

    #[test]
    fn arbitrary_file_names_stay_inside(
        topology in name_bytes(),
        extras in proptest::collection::vec(name_bytes(), 0..6),
        reuse in "[a-zA-Z0-9]{0,6}",
    ) {
        let mut form = form().raw_file("topology", &topology, b"nodes: [r1]\n");
        for extra in &extras {
            form = form.raw_file("extra_files", extra, b"x");
        }
        run(&form.text("reuse", &reuse).body());
    }
}
