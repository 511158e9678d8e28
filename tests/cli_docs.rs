//! The man pages and shell completions in man/ and completions/ are generated
//! from the clap definitions in src/cli (clap_mangen, clap_complete) and
//! committed; this test regenerates them and fails when the committed files
//! are stale. `make man` (MIRROR_UPDATE_DOCS=1) writes them instead.
//!
//! It also renders every page in man/ (the hand-written config page too) with
//! `man --warnings` and `groff -ww` and fails on any warning, checks that the
//! config page documents every key src/config reads, and that the bash
//! completion completes commands and options.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use common::{require_tool, run};
use nbd_mirror::cli;

const UPDATE_ENV: &str = "MIRROR_UPDATE_DOCS";
const SOURCE: &str = concat!("nbd-mirror ", env!("CARGO_PKG_VERSION"));
const MANUAL: &str = "System Administration";
const T: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The two lines roff puts before everything it renders (the apostrophe string `\*(Aq`);
/// each section below is rendered on its own, so they are kept once, at the top.
const PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

type Render = fn(&Man, &mut dyn std::io::Write) -> std::io::Result<()>;

/// One section of `man`, without roff's preamble.
fn section(man: &Man, render: Render) -> String {
    let mut out = Vec::new();
    render(man, &mut out).expect("render to memory");
    let text = String::from_utf8(out).expect("clap_mangen writes UTF-8");
    match text.strip_prefix(PREAMBLE) {
        Some(rest) => rest.to_string(),
        None => panic!("roff's preamble changed: {text:?}"),
    }
}

/// A section of `man` without its `.SH NAME` line, to go under another heading.
fn body(man: &Man, render: Render) -> String {
    let text = section(man, render);
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    assert!(first.starts_with(".SH "), "clap_mangen section: {first}");
    rest.to_string()
}

fn man_for(cmd: clap::Command, title: &str) -> Man {
    Man::new(cmd)
        .title(title)
        .section("8")
        .source(SOURCE)
        .manual(MANUAL)
}

/// The head every page shares: title, NAME, SYNOPSIS, DESCRIPTION, OPTIONS.
fn head(man: &Man) -> String {
    let sections: [Render; 5] = [
        Man::render_title,
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
        Man::render_options_section,
    ];
    let mut page = PREAMBLE.to_string();
    for render in sections {
        page.push_str(&section(man, render));
    }
    page
}

fn mirrord_page() -> String {
    let mut cmd = cli::mirrord::Args::command();
    cmd.build();
    head(&man_for(cmd, "MIRRORD")) + MIRRORD_EXTRA + COMMON_EXTRA
}

/// mirrorctl(8): one page, as drbdadm(8) is, with a COMMANDS section holding
/// each subcommand's synopsis, description and options.
fn mirrorctl_page() -> String {
    let mut cmd = cli::mirrorctl::Args::command();
    cmd.build();
    let mut page = head(&man_for(cmd.clone(), "MIRRORCTL"));
    page.push_str(".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // The global options (--config, --node) and --help are on the page once, above.
        let mut sub = sub.clone();
        let shared: Vec<String> = sub
            .get_arguments()
            .filter(|a| a.is_global_set() || a.get_id() == "help")
            .map(|a| a.get_id().to_string())
            .collect();
        for id in shared {
            sub = sub.mut_arg(id, |a| a.hide(true));
        }
        let man = man_for(sub.clone(), "MIRRORCTL");
        page.push_str(&format!(".SS {}\n", sub.get_name()));
        page.push_str(&body(&man, Man::render_synopsis_section));
        page.push_str(".PP\n");
        page.push_str(&body(&man, Man::render_description_section));
        if sub
            .get_arguments()
            .any(|a| !a.is_hide_set() && !a.is_positional())
        {
            page.push_str(".RS\n");
            page.push_str(&body(&man, Man::render_options_section));
            page.push_str(".RE\n");
        }
    }
    page + MIRRORCTL_EXTRA + COMMON_EXTRA
}

/// Every generated file: path under the repository, contents.
fn generated() -> Vec<(PathBuf, String)> {
    let mut files = vec![
        (PathBuf::from("man/mirrord.8"), mirrord_page()),
        (PathBuf::from("man/mirrorctl.8"), mirrorctl_page()),
    ];
    let programs = [
        ("mirrord", cli::mirrord::Args::command()),
        ("mirrorctl", cli::mirrorctl::Args::command()),
    ];
    for (name, cmd) in programs {
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), name, &mut out);
            let text = String::from_utf8(out).expect("completions are UTF-8");
            files.push((PathBuf::from("completions").join(file), text));
        }
    }
    files
}

#[test]
fn generated_pages_and_completions_are_current() {
    let update = std::env::var_os(UPDATE_ENV).is_some_and(|v| !v.is_empty());
    let mut stale = Vec::new();
    for (rel, text) in generated() {
        let path = repo().join(&rel);
        if update {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).expect("create man/ or completions/");
            }
            std::fs::write(&path, &text)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(rel.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale or missing (regenerate with `make man` and commit): {}",
        stale.join(", ")
    );
}

/// `man`'s output without overstrike (bold "N\x08N", underline "_\x08x").
fn plain(text: &str) -> String {
    let mut out: Vec<char> = Vec::with_capacity(text.len());
    for c in text.chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out.into_iter().collect()
}

fn pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("man"))
        .expect("man/ exists")
        .map(|e| e.expect("read man/").path())
        .filter(|p| p.extension().is_some_and(|x| x == "5" || x == "8"))
        .collect();
    pages.sort();
    pages
}

#[test]
fn every_page_renders_without_warnings() {
    require_tool("man");
    require_tool("groff");
    let pages = pages();
    let names: Vec<String> = pages
        .iter()
        .map(|p| {
            p.file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for want in ["mirrord.8", "mirrorctl.8", "nbd-mirror.toml.5"] {
        assert!(
            names.iter().any(|n| n == want),
            "man/{want} missing: {names:?}"
        );
    }
    for page in &pages {
        let mut man = Command::new("man");
        man.env("MANWIDTH", "80")
            .args(["--warnings", "-l"])
            .arg(page);
        let out = run_quiet(&mut man);
        let text = plain(&out.stdout);
        assert!(
            text.contains("NAME") && text.contains("SEE ALSO") && text.lines().count() > 20,
            "man -l {} printed too little\n{}",
            page.display(),
            out.describe()
        );
        let mut groff = Command::new("groff");
        groff.args(["-ww", "-man", "-Tutf8", "-z"]).arg(page);
        run_quiet(&mut groff);
    }
}

/// Runs `cmd`; it must succeed and print nothing on stderr (no warning).
fn run_quiet(cmd: &mut Command) -> common::CmdOutput {
    let out = run(cmd, T);
    assert!(
        out.success() && out.stderr.trim().is_empty(),
        "a warning or a failure\n{}",
        out.describe()
    );
    out
}

/// The keys src/config reads: string literals passed to the table reader
/// (`req_str("name")`, `bool_or("direct-io", ..)`, `policy("after-sb-0pri", ..)`, ...).
fn config_keys() -> Vec<String> {
    const READERS: [&str; 10] = [
        "req_str(",
        "opt_str(",
        "str_or(",
        "bool_or(",
        "u64_or(",
        "parsed_or(",
        "choice_or(",
        "table(",
        "table_array(",
        "policy(",
    ];
    let mut keys = Vec::new();
    let dir = repo().join("src/config");
    for entry in std::fs::read_dir(&dir).expect("src/config") {
        let path = entry.expect("read src/config").path();
        let name = path.file_name().expect("a file").to_string_lossy();
        if !name.ends_with(".rs") || name.contains("test") || name == "table.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read config source");
        for reader in READERS {
            for (at, _) in text.match_indices(reader) {
                let rest = text[at + reader.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                let Some(end) = rest.find('"') else { continue };
                let key = &rest[..end];
                if !key.is_empty() && !keys.iter().any(|k| k == key) {
                    keys.push(key.to_string());
                }
            }
        }
    }
    keys.sort();
    keys
}

#[test]
fn the_config_page_documents_every_key() {
    let keys = config_keys();
    for sure in [
        "name",
        "shared-secret-file",
        "after-sb-2pri",
        "ko-count",
        "node",
    ] {
        assert!(
            keys.iter().any(|k| k == sure),
            "key scan missed {sure}: {keys:?}"
        );
    }
    let page = std::fs::read_to_string(repo().join("man/nbd-mirror.toml.5"))
        .expect("man/nbd-mirror.toml.5");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let roff = k.replace('-', "\\-");
            !page.contains(&format!("\\fB{roff}\\fR")) && !page.contains(&format!("[{roff}]"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "keys read by src/config but not documented in man/nbd-mirror.toml.5 \
         (as \\fBkey\\fR or [table]): {missing:?}"
    );
}

#[test]
fn the_example_config_parses_and_shows_every_key() {
    let path = repo().join("examples/r0.toml");
    let text = std::fs::read_to_string(&path).expect("examples/r0.toml");
    for node in ["alpha", "beta"] {
        let s = nbd_mirror::config::parse(&path, &text, Some(node))
            .unwrap_or_else(|e| panic!("the example does not parse for {node}: {e}"));
        assert_eq!(s.resource, "r0");
    }
    let missing: Vec<String> = config_keys()
        .into_iter()
        .filter(|k| !text.contains(&format!("{k} = ")) && !text.contains(&format!("[{k}]")))
        .filter(|k| !text.contains(&format!("[[{k}]]")))
        .collect();
    assert!(
        missing.is_empty(),
        "keys not shown in examples/r0.toml: {missing:?}"
    );
}

/// Asks the generated bash completion what it offers after `words`.
fn bash_complete(words: &str) -> Vec<String> {
    let script = repo().join("completions/mirrorctl.bash");
    let cmd = format!(
        "source {} && COMP_WORDS=({words}) && COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)) && \
         COMP_LINE=\"${{COMP_WORDS[*]}}\" && COMP_POINT=${{#COMP_LINE}} && \
         _mirrorctl mirrorctl \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\" && \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let mut bash = Command::new("bash");
    bash.args(["--norc", "--noprofile", "-c", &cmd]);
    let out = run(&mut bash, T);
    out.assert_success();
    out.stdout.lines().map(str::to_string).collect()
}

#[test]
fn bash_completion_offers_commands_and_options() {
    let top = bash_complete("mirrorctl ''");
    for want in ["status", "create-md", "wait-sync", "--config"] {
        assert!(top.iter().any(|w| w == want), "mirrorctl <TAB>: {top:?}");
    }
    let st = bash_complete("mirrorctl status --");
    assert!(st.iter().any(|w| w == "--json"), "status --<TAB>: {st:?}");
    let st = bash_complete("mirrorctl resync --");
    for want in ["--full", "--checksum", "--wait"] {
        assert!(st.iter().any(|w| w == want), "resync --<TAB>: {st:?}");
    }
}

const MIRRORD_EXTRA: &str = r#".SH SIGNALS
.TP
.B SIGTERM
Stop accepting, finish or fail the requests in flight, persist the metadata,
exit 0.
With \fBNOTIFY_SOCKET\fR and \fBMIRRORD_FDSTORE=1\fR (the shipped unit) it fails
nothing: it answers every request already read and hands the NBD connections,
listeners and disk lock to systemd's file descriptor store for the next start.
.SH EXIT STATUS
.TP
.B 0
stopped by SIGTERM
.TP
.B 1
running failed (the message says why)
.TP
.B 2
bad usage or a bad config (the message names the file, key and problem)
.SH EXAMPLES
.TP
.B mirrord r0
run the resource of /etc/nbd\-mirror/r0.toml on this host
.TP
.B systemctl start mirrord@r0
the same under systemd (\fImirrord@.service\fR)
"#;

const MIRRORCTL_EXTRA: &str = r#".SH EXIT STATUS
.TP
.B 0
success
.TP
.B 1
the operation failed (the message says why)
.TP
.B 2
bad usage or a bad config (the message names the file, key and problem)
.TP
.B 3
the daemon is not reachable
.SH EXAMPLES
.nf
mirrorctl gen\-secret r0          # once; copy the file to the other node
mirrorctl create\-md r0           # once per node
mirrorctl primary \-\-force r0     # on the node whose data wins the first sync
mirrorctl status r0
mirrorctl \-\-config /srv/r1.toml \-\-node beta status \-\-json
.fi
"#;

const COMMON_EXTRA: &str = r#".SH ENVIRONMENT
.TP
.B MIRROR_NODE
this node's name when \fB\-\-node\fR is not given (default: the host name)
.TP
.B MIRROR_CONF_DIR
the directory that holds \fIRESOURCE\fR.toml (default: /etc/nbd\-mirror)
.TP
.B RUST_LOG
log filter of mirrord when \fB\-\-log\-level\fR is not given
.SH FILES
.TP
.I /etc/nbd\-mirror/RESOURCE.toml
the resource's config, the same file on both nodes; see
.BR nbd\-mirror.toml (5)
.TP
.I /etc/nbd\-mirror/RESOURCE.secret
the shared secret of the peer link (\fBmirrorctl gen\-secret\fR)
.TP
.I /run/nbd\-mirror/RESOURCE.ctl
the control socket (\fIrun\-dir\fR of the config)
.TP
.I /run/nbd\-mirror/RESOURCE.nbd
the NBD export's default unix socket
.SH SEE ALSO
.BR mirrord (8),
.BR mirrorctl (8),
.BR nbd\-mirror.toml (5),
.BR nbd\-client (8)
.PP
/usr/share/doc/nbd\-mirror: README.md, OPERATIONS.md, INTERFACE.md
"#;
