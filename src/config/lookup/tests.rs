use super::*;

const ONE: &str =
    "[resource]\nname = \"NAME\"\n\n[[node]]\nname = \"alpha\"\ndisk = \"/tmp/a.img\"\n";

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("temp dir");
    for (file, resource) in files {
        std::fs::write(d.path().join(file), ONE.replace("NAME", resource)).expect("write config");
    }
    d
}

#[test]
fn a_name_reads_its_file_in_the_directory() {
    let d = dir_with(&[("r0.toml", "r0"), ("r1.toml", "r1")]);
    let s = load_in(d.path(), None, Some("r1"), Some("alpha")).expect("r1 loads");
    assert_eq!(s.resource, "r1");
    assert_eq!(s.file, d.path().join("r1.toml"));
}

#[test]
fn a_missing_resource_names_the_file_and_the_override() {
    let d = dir_with(&[("r0.toml", "r0")]);
    let e = load_in(d.path(), None, Some("r9"), Some("alpha")).unwrap_err();
    assert_eq!(e.file, d.path().join("r9.toml"));
    assert!(e.reason.contains("no such resource"), "{e}");
    assert!(e.reason.contains(CONF_DIR_ENV), "{e}");
}

#[test]
fn no_name_and_no_file_lists_what_is_there() {
    let d = dir_with(&[("r1.toml", "r1"), ("r0.toml", "r0")]);
    std::fs::write(d.path().join("r0.secret"), "x").expect("write");
    let e = load_in(d.path(), None, None, Some("alpha")).unwrap_err();
    assert!(e.reason.contains("found there: r0, r1"), "{e}");
    assert_eq!(resources_in(d.path()), vec!["r0", "r1"]);
    let empty = dir_with(&[]);
    let e = load_in(empty.path(), None, None, Some("alpha")).unwrap_err();
    assert!(e.reason.contains("none found"), "{e}");
}

#[test]
fn a_file_for_another_resource_is_refused() {
    let d = dir_with(&[("r0.toml", "other")]);
    let e = load_in(d.path(), None, Some("r0"), Some("alpha")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("resource.name"));
    assert!(e.reason.contains("`other`"), "{e}");
    // --config with the matching name, and --config alone, are fine.
    let f = d.path().join("r0.toml");
    let s = load_in(d.path(), Some(&f), Some("other"), Some("alpha")).expect("matching name");
    assert_eq!(s.resource, "other");
    assert!(load_in(d.path(), Some(&f), None, Some("alpha")).is_ok());
    let e = load_in(d.path(), Some(&f), Some("r0"), Some("alpha")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("resource.name"), "{e}");
}

#[test]
fn names_that_are_not_resource_names_are_refused_before_any_file_is_read() {
    let d = dir_with(&[]);
    for bad in ["../etc/passwd", "a/b", "", "..", "x y"] {
        let e = load_in(d.path(), None, Some(bad), Some("alpha")).unwrap_err();
        assert!(e.reason.contains("not a resource name"), "{bad:?}: {e}");
    }
}
