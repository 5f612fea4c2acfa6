//! The Terraform in `terraform/*`: providers cannot be downloaded here, so `terraform
//! validate` cannot run. Instead every file is parsed (HCL) and every reference must
//! resolve: `var.*` to a declared variable, `local.*` to a local, `<type>.<name>` and
//! `data.<type>.<name>` to a declared resource or data source. Every variable has a
//! description and is used.

use std::collections::BTreeSet;
use std::path::Path;

struct Module {
    variables: BTreeSet<String>,
    locals: BTreeSet<String>,
    resources: BTreeSet<String>,
    data: BTreeSet<String>,
    text: String,
    problems: Vec<String>,
}

fn label(b: &hcl::Block, i: usize) -> String {
    b.labels().get(i).map(|l| l.as_str().to_string()).unwrap_or_default()
}

fn load(dir: &Path) -> Module {
    let mut m = Module {
        variables: BTreeSet::new(),
        locals: BTreeSet::new(),
        resources: BTreeSet::new(),
        data: BTreeSet::new(),
        text: String::new(),
        problems: Vec::new(),
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tf"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .tf files in {}", dir.display());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let body: hcl::Body = hcl::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for block in body.blocks() {
            match block.identifier() {
                "variable" => {
                    let name = label(block, 0);
                    if !block.body().attributes().any(|a| a.key() == "description") {
                        m.problems.push(format!("variable {name} has no description"));
                    }
                    m.variables.insert(name);
                }
                "locals" => m.locals.extend(block.body().attributes().map(|a| a.key().to_string())),
                "resource" => {
                    m.resources.insert(format!("{}.{}", label(block, 0), label(block, 1)));
                }
                "data" => {
                    m.data.insert(format!("{}.{}", label(block, 0), label(block, 1)));
                }
                "output" | "terraform" | "provider" | "module" => {}
                other => m.problems.push(format!("{}: unexpected block {other}", f.display())),
            }
        }
        // references are checked on the text without comments
        for line in text.lines() {
            let code = line.split_once('#').map(|(c, _)| c).unwrap_or(line);
            m.text.push_str(code);
            m.text.push('\n');
        }
    }
    m
}

fn check(dir: &Path) -> Vec<String> {
    let mut m = load(dir);
    let var_re = regex::Regex::new(r"\bvar\.([A-Za-z0-9_]+)").unwrap();
    let local_re = regex::Regex::new(r"\blocal\.([A-Za-z0-9_]+)").unwrap();
    let data_re = regex::Regex::new(r"\bdata\.([a-z0-9_]+)\.([A-Za-z0-9_]+)").unwrap();
    let res_re =
        regex::Regex::new(r#"(?:^|[^"\w.])((?:cloudflare|hcloud|random|tls|local|null)_[a-z0-9_]+)\.([A-Za-z0-9_]+)"#)
            .unwrap();
    let mut used = BTreeSet::new();
    for c in var_re.captures_iter(&m.text) {
        used.insert(c[1].to_string());
        if !m.variables.contains(&c[1]) {
            m.problems.push(format!("var.{} is not declared", &c[1]));
        }
    }
    for c in local_re.captures_iter(&m.text) {
        if !m.locals.contains(&c[1]) {
            m.problems.push(format!("local.{} is not declared", &c[1]));
        }
    }
    for c in data_re.captures_iter(&m.text) {
        if !m.data.contains(&format!("{}.{}", &c[1], &c[2])) {
            m.problems.push(format!("data.{}.{} is not declared", &c[1], &c[2]));
        }
    }
    for c in res_re.captures_iter(&m.text) {
        let r = format!("{}.{}", &c[1], &c[2]);
        if !m.resources.contains(&r) {
            m.problems.push(format!("{r} is not declared"));
        }
    }
    for v in m.variables.difference(&used) {
        m.problems.push(format!("variable {v} is never used"));
    }
    m.problems
}

#[test]
fn every_module_parses_and_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("terraform");
    let mut checked = 0;
    for dir in std::fs::read_dir(&root).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        let problems = check(&dir);
        assert!(problems.is_empty(), "{}: {problems:#?}", dir.display());
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn the_checker_catches_broken_references() {
    let dir = wakegate_testkit::tempdir("tf");
    std::fs::write(
        dir.join("main.tf"),
        "variable \"a\" {\n  type = string\n}\nresource \"cloudflare_dns_record\" \"x\" {\n  name    = var.b\n  content = local.c\n  zone_id = cloudflare_zone.missing.id\n}\n",
    )
    .unwrap();
    let problems = check(&dir).join("\n");
    for expected in [
        "variable a has no description",
        "var.b is not declared",
        "local.c is not declared",
        "cloudflare_zone.missing is not declared",
        "variable a is never used",
    ] {
        assert!(problems.contains(expected), "missing {expected:?} in:\n{problems}");
    }
}
