//! The README's two commands, read from README.md itself, so that the tests run what a new
//! user types and the README cannot drift from them.
//!
//! The commands are the shell lines (comments aside) of the first ```sh block under the
//! heading `## The two commands`: the main job first, the tests second.

use std::path::{Path, PathBuf};

/// The workspace's top directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The main command and the test command, as printed.
pub fn two_commands() -> (String, String) {
    let text = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    two_commands_in(&text).unwrap_or_else(|e| panic!("README.md: {e}"))
}

pub fn two_commands_in(readme: &str) -> Result<(String, String), String> {
    let section = readme
        .split("\n## The two commands\n")
        .nth(1)
        .ok_or("no `## The two commands` section")?;
    let section = section.split("\n## ").next().unwrap_or(section);
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .ok_or("no ```sh block in `## The two commands`")?;
    let commands: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    match commands.as_slice() {
        [main, tests] => Ok((main.to_string(), tests.to_string())),
        other => Err(format!(
            "`## The two commands` must show exactly two commands, found {}: {other:?}",
            other.len()
        )),
    }
}

/// `cargo run [--release] -p PACKAGE -- ARGS...`, taken apart.
#[derive(Debug, PartialEq, Eq)]
pub struct CargoRun {
    pub package: String,
    pub release: bool,
    pub args: Vec<String>,
}

pub fn parse_cargo_run(command: &str) -> Result<CargoRun, String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let (cargo, args) = match words.iter().position(|w| *w == "--") {
        Some(i) => (&words[..i], &words[i + 1..]),
        None => (&words[..], &[][..]),
    };
    let [first, second, options @ ..] = cargo else {
        return Err(format!("{command:?} is not `cargo run ...`"));
    };
    if (*first, *second) != ("cargo", "run") {
        return Err(format!("{command:?} is not `cargo run ...`"));
    }
    let mut package = None;
    let mut release = false;
    let mut options = options.iter();
    while let Some(o) = options.next() {
        match *o {
            "--release" => release = true,
            "-p" | "--package" => package = options.next().map(|p| p.to_string()),
            other => return Err(format!("{command:?}: option {other} is not expected")),
        }
    }
    Ok(CargoRun {
        package: package.ok_or_else(|| format!("{command:?} names no package (-p)"))?,
        release,
        args: args.iter().map(|a| a.to_string()).collect(),
    })
}

/// The `default-run` binary of a workspace package (what `cargo run -p PACKAGE` runs when
/// the package has more than one).
pub fn default_run(package_dir: &str) -> Option<String> {
    let manifest =
        std::fs::read_to_string(workspace().join(package_dir).join("Cargo.toml")).ok()?;
    manifest.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "default-run").then(|| value.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_gives_two_commands_or_says_what_is_wrong() {
        let ok = "# x\n\n## The two commands\n\ntext\n\n```sh\n# main\ncargo run -p hub -- demo\n\n# tests\nbash .ci/run\n```\n\n## Next\n```sh\nnot this\n```\n";
        assert_eq!(
            two_commands_in(ok),
            Ok(("cargo run -p hub -- demo".into(), "bash .ci/run".into()))
        );
        let three = ok.replace("bash .ci/run", "bash .ci/run\nmake");
        assert!(two_commands_in(&three).unwrap_err().contains("found 3"));
        assert!(two_commands_in("# nothing\n").is_err());
    }

    #[test]
    fn cargo_run_is_taken_apart() {
        assert_eq!(
            parse_cargo_run("cargo run --release -p hub -- demo --clusters 5"),
            Ok(CargoRun {
                package: "hub".into(),
                release: true,
                args: vec!["demo".into(), "--clusters".into(), "5".into()],
            })
        );
        assert!(parse_cargo_run("cargo run -- demo").is_err(), "no package");
        assert!(parse_cargo_run("cargo build -p hub").is_err());
        assert!(parse_cargo_run("cargo run --bin x -p hub -- demo").is_err());
    }
}
