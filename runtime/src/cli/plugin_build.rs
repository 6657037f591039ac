//! `wasmq plugins build tasks.py`: a Python module of `@task` functions → a plugin component.
//!
//! The build needs nothing but a `python3` with `venv` (or `$WASMQ_PYTHON`) and, on first
//! use, the network to PyPI:
//!
//! 1. **The toolchain** — componentize-py at [`COMPONENTIZE_PY_VERSION`] — is installed once
//!    into a virtualenv in the toolchain directory ([`toolchain_dir`]: `$WASMQ_TOOLCHAIN_DIR`,
//!    else `$XDG_CACHE_HOME/wasmq/toolchains`, else `~/.cache/wasmq/toolchains`; not
//!    `$WASMQ_CACHE_DIR`, which is the worker's artifact cache), under
//!    `componentize-py-<version>`. It is built under a temporary name and renamed
//!    into place, so an interrupted install is never mistaken for a finished one, and it is
//!    only ever run as `<venv>/bin/python -m …` (a renamed venv's scripts would point at the
//!    old name).
//! 2. **The plugin's dependencies** — `requirements.txt` beside the module, or
//!    `--requirements FILE` — are installed with that pip into a site folder kept in the
//!    toolchain directory by the SHA-256 of the file (`python-site-<sha>`), so a rebuild does not download
//!    them again. They must be pure Python: the plugin runs on CPython compiled to Wasm.
//! 3. **The contract and the SDK come from this binary**: `wit/task.wit` and the
//!    `sdk-python/src/wasmq` sources are embedded at compile time and written to a
//!    temporary folder for each build, so the plugin always targets the contract this
//!    worker serves and the SDK that implements it (an installed `wasmq-sdk` is not used).
//! 4. componentize-py wraps a generated entry module (`import tasks; from wasmq._guest
//!    import Plugin`) with the module's folder, the SDK and the site folder on its path. It
//!    imports the module at build time (the component is pre-initialised), so a syntax
//!    error or a missing dependency fails the build, and is reported as one line naming
//!    the file and line (not componentize-py's own stack).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use clap::Args;
use sha2::{Digest, Sha256};

use super::exit::Failure;
use crate::units::{format_bytes, format_duration};

/// The componentize-py release `wasmq plugins build` installs (from PyPI).
const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// The WIT world the plugin targets, in [`TASK_WIT`].
const WORLD: &str = "task-plugin";

/// The contract this binary serves (the repository's `wit/task.wit`).
const TASK_WIT: &str = include_str!("../../../wit/task.wit");

/// The Python SDK (`sdk-python/src/wasmq`), written into every build.
const SDK_FILES: &[(&str, &str)] = &[
    (
        "__init__.py",
        include_str!("../../../sdk-python/src/wasmq/__init__.py"),
    ),
    (
        "_context.py",
        include_str!("../../../sdk-python/src/wasmq/_context.py"),
    ),
    (
        "_errors.py",
        include_str!("../../../sdk-python/src/wasmq/_errors.py"),
    ),
    (
        "_guest.py",
        include_str!("../../../sdk-python/src/wasmq/_guest.py"),
    ),
    (
        "_task.py",
        include_str!("../../../sdk-python/src/wasmq/_task.py"),
    ),
    (
        "_units.py",
        include_str!("../../../sdk-python/src/wasmq/_units.py"),
    ),
];

/// The module componentize-py wraps: it imports the plugin's module, then the SDK's export.
const ENTRY_MODULE: &str = "wasmq_plugin_entry";

/// `wasmq plugins build`'s arguments.
#[derive(Debug, Args)]
pub(super) struct BuildArgs {
    /// The Python module holding the `@task` functions (e.g. tasks.py); its folder is on the
    /// plugin's import path, so modules beside it can be imported.
    source: PathBuf,
    /// The component to write. Default: the module's name with `.wasm`, in the current
    /// folder.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Pure-Python dependencies to install into the plugin. Default: `requirements.txt`
    /// beside the module, if there is one.
    #[arg(long, value_name = "FILE")]
    requirements: Option<PathBuf>,
}

/// Runs `wasmq plugins build`.
pub(super) fn run(args: BuildArgs) -> Result<(), Failure> {
    let started = Instant::now();
    let source = &args.source;
    let module = module_name(source)?;
    let source_dir = source
        .canonicalize()
        .map_err(|e| Failure::bad_input(format!("cannot read {}: {e}", source.display())))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{module}.wasm")));
    let requirements = match &args.requirements {
        Some(path) if !path.is_file() => {
            return Err(Failure::bad_input(format!(
                "--requirements {}: no such file",
                path.display()
            )));
        }
        Some(path) => Some(path.clone()),
        None => Some(source_dir.join("requirements.txt")).filter(|p| p.is_file()),
    };

    let toolchains = toolchain_dir().ok_or_else(|| {
        Failure::internal(anyhow::anyhow!(
            "no directory for the Python toolchain: set WASMQ_TOOLCHAIN_DIR (or HOME)"
        ))
    })?;
    let python = toolchain(&toolchains)?;
    let site = match &requirements {
        Some(file) => Some(site_packages(&python, &toolchains, file)?),
        None => None,
    };

    let stage = tempfile::tempdir()
        .map_err(|e| Failure::internal(anyhow::anyhow!("cannot create a build folder: {e}")))?;
    let staged = stage_sources(stage.path(), &module)
        .map_err(|e| Failure::internal(anyhow::anyhow!("cannot write the build folder: {e}")))?;

    let mut command = Command::new(&python);
    command
        .arg("-c")
        .arg("import sys; from componentize_py import script; sys.argv[0] = 'componentize-py'; script()")
        .arg("--quiet")
        .arg("-d")
        .arg(&staged.wit)
        .args(["-w", WORLD, "componentize", ENTRY_MODULE])
        .arg("-p")
        .arg(&source_dir)
        .arg("-p")
        .arg(&staged.entry)
        .arg("-p")
        .arg(&staged.sdk);
    if let Some(site) = &site {
        command.arg("-p").arg(site);
    }
    // Written beside the output and renamed into place: a worker watching that folder never
    // sees half a component.
    let partial = output.with_file_name(format!(
        ".{}.partial-{}",
        output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    command
        .arg("-o")
        .arg(&partial)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .env_remove("VIRTUAL_ENV");
    let result = command.output().map_err(|e| {
        Failure::internal(anyhow::anyhow!(
            "cannot run componentize-py ({}): {e}",
            python.display()
        ))
    })?;
    if !result.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(Failure::bad_input(build_error(
            source,
            &module,
            &String::from_utf8_lossy(&result.stderr),
        )));
    }
    std::fs::rename(&partial, &output).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        Failure::bad_input(format!("cannot write {}: {e}", output.display()))
    })?;
    let size = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}: built {} ({}, componentize-py {COMPONENTIZE_PY_VERSION}, {})",
        output.display(),
        source.display(),
        format_bytes(size),
        format_duration(Duration::from_millis(
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
        )),
    );
    Ok(())
}

/// The module's import name: the file stem, which must be a Python identifier.
fn module_name(source: &Path) -> Result<String, Failure> {
    if source.extension() != Some(OsStr::new("py")) {
        return Err(Failure::bad_input(format!(
            "{}: expected a Python module (a .py file)",
            source.display()
        )));
    }
    if !source.is_file() {
        return Err(Failure::bad_input(format!(
            "{}: no such file",
            source.display()
        )));
    }
    let stem = source
        .file_stem()
        .and_then(OsStr::to_str)
        .unwrap_or_default();
    let identifier = stem
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !identifier || stem == "wasmq" || stem == ENTRY_MODULE || stem == "wit_world" {
        return Err(Failure::bad_input(format!(
            "{}: `{stem}` cannot be imported as a Python module name (rename the file)",
            source.display()
        )));
    }
    Ok(stem.to_owned())
}

/// Where `wasmq plugins build` keeps its toolchain and plugins' dependencies:
/// `$WASMQ_TOOLCHAIN_DIR`, else `$XDG_CACHE_HOME/wasmq/toolchains`, else
/// `~/.cache/wasmq/toolchains` (beside the worker's `artifacts`).
fn toolchain_dir() -> Option<PathBuf> {
    std::env::var_os("WASMQ_TOOLCHAIN_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|dir| dir.join("wasmq").join("toolchains")))
}

/// The toolchain's interpreter, installing componentize-py into `<root>/componentize-py-<v>`
/// first if needed.
fn toolchain(root: &Path) -> Result<PathBuf, Failure> {
    let venv = root.join(format!("componentize-py-{COMPONENTIZE_PY_VERSION}"));
    let python = venv.join("bin").join("python");
    if python.exists() {
        return Ok(python);
    }
    let cannot = |why: String| {
        Failure::internal(anyhow::anyhow!(
            "cannot install the Python toolchain (componentize-py {COMPONENTIZE_PY_VERSION}) into {}: {why}",
            venv.display()
        ))
    };
    eprintln!(
        "installing componentize-py {COMPONENTIZE_PY_VERSION} into {} (first build only)",
        venv.display()
    );
    std::fs::create_dir_all(root).map_err(|e| cannot(e.to_string()))?;
    let host_python = std::env::var_os("WASMQ_PYTHON").unwrap_or_else(|| "python3".into());
    let partial = root.join(format!(
        ".componentize-py-{COMPONENTIZE_PY_VERSION}.{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    let install = || -> Result<(), String> {
        checked(
            Command::new(&host_python)
                .arg("-m")
                .arg("venv")
                .arg(&partial),
            &format!("{} -m venv", host_python.to_string_lossy()),
        )?;
        checked(
            Command::new(partial.join("bin").join("python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg(format!("componentize-py=={COMPONENTIZE_PY_VERSION}")),
            "pip install componentize-py",
        )
    };
    if let Err(why) = install() {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(cannot(why));
    }
    // Another build may have finished first: theirs is as good as ours.
    if std::fs::rename(&partial, &venv).is_err() && python.exists() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    if python.exists() {
        Ok(python)
    } else {
        Err(cannot(format!("{} is missing", python.display())))
    }
}

/// The site folder holding `requirements`' packages, installed with the toolchain's pip into
/// `<root>/python-site-<sha256 of the file>` if it is not there yet.
fn site_packages(python: &Path, root: &Path, requirements: &Path) -> Result<PathBuf, Failure> {
    let text = std::fs::read(requirements)
        .map_err(|e| Failure::bad_input(format!("cannot read {}: {e}", requirements.display())))?;
    let digest = hex::encode(Sha256::digest(&text));
    let site = root.join(format!("python-site-{}", &digest[..16]));
    if site.is_dir() {
        return Ok(site);
    }
    let partial = root.join(format!(
        ".python-site-{}.{}",
        &digest[..16],
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&partial);
    let installed = checked(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-compile",
                "--target",
            ])
            .arg(&partial)
            .arg("-r")
            .arg(requirements),
        "pip install",
    );
    if let Err(why) = installed {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(Failure::bad_input(format!(
            "cannot install the plugin's dependencies ({}): {why}",
            requirements.display()
        )));
    }
    if std::fs::rename(&partial, &site).is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    Ok(site)
}

/// Runs a command; on failure, its last line of output that says something.
fn checked(command: &mut Command, what: &str) -> Result<(), String> {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&stderr);
    let stdout = String::from_utf8_lossy(&stdout);
    let last = stderr
        .lines()
        .rev()
        .chain(stdout.lines().rev())
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("[notice]"))
        .unwrap_or("no output");
    Err(format!("{what} failed ({status}): {last}"))
}

/// The folders a build gives componentize-py.
struct Staged {
    wit: PathBuf,
    entry: PathBuf,
    sdk: PathBuf,
}

/// Writes the embedded WIT, the embedded SDK and the entry module under `stage`.
fn stage_sources(stage: &Path, module: &str) -> std::io::Result<Staged> {
    let staged = Staged {
        wit: stage.join("wit"),
        entry: stage.join("entry"),
        sdk: stage.join("sdk"),
    };
    std::fs::create_dir_all(&staged.wit)?;
    std::fs::write(staged.wit.join("task.wit"), TASK_WIT)?;
    std::fs::create_dir_all(staged.sdk.join("wasmq"))?;
    for (name, text) in SDK_FILES {
        std::fs::write(staged.sdk.join("wasmq").join(name), text)?;
    }
    std::fs::create_dir_all(&staged.entry)?;
    std::fs::write(
        staged.entry.join(format!("{ENTRY_MODULE}.py")),
        format!(
            "# Generated by `wasmq plugins build`: the module componentize-py wraps.\n\
             import {module}  # noqa: F401  (registers its @task functions)\n\
             from wasmq._guest import Plugin  # noqa: F401  (the WIT `plugin` export)\n"
        ),
    )?;
    Ok(staged)
}

/// One line for a failed build: the Python exception componentize-py reports (after its
/// `Caused by:`), with the line of the plugin's module the traceback points at.
fn build_error(source: &Path, module: &str, stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).collect();
    let summary = lines
        .iter()
        .position(|l| *l == "Caused by:")
        .and_then(|at| lines[at + 1..].iter().find(|l| !l.is_empty()))
        .or_else(|| {
            lines
                .iter()
                .rfind(|l| !l.is_empty() && !l.starts_with("Stack backtrace"))
        })
        .copied()
        .unwrap_or("componentize-py failed without a message");
    let frame = format!("/{module}.py\", line ");
    let line = lines
        .iter()
        .rev()
        .filter(|l| l.starts_with("File \""))
        .find_map(|l| {
            let at = l.find(&frame)? + frame.len();
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            (!digits.is_empty()).then_some(digits)
        });
    match line {
        Some(line) => format!("{}:{line}: {summary}", source.display()),
        None => format!("{}: {summary}", source.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syntax_error_is_one_line_with_the_file_and_line() {
        let stderr = "Traceback (most recent call last):\n  File \"<string>\", line 1, in <module>\n\
            AssertionError: Traceback (most recent call last):\n  File \"/0/wasmq_plugin_entry.py\", line 2, in <module>\n\
            \x20   import tasks\n  File \"/0/tasks.py\", line 4\n    def add(a, b)\n                 ^\n\
            SyntaxError: expected ':'\n\n\nCaused by:\n    SyntaxError: expected ':' (tasks.py, line 4)\n";
        assert_eq!(
            build_error(Path::new("ex/tasks.py"), "tasks", stderr),
            "ex/tasks.py:4: SyntaxError: expected ':' (tasks.py, line 4)"
        );
    }

    #[test]
    fn a_missing_module_names_it() {
        let stderr = "  File \"/0/tasks.py\", line 1, in <module>\n    import nosuchmod\n\
            ModuleNotFoundError: No module named 'nosuchmod'\n\nCaused by:\n    ModuleNotFoundError: No module named 'nosuchmod'\n";
        assert_eq!(
            build_error(Path::new("tasks.py"), "tasks", stderr),
            "tasks.py:1: ModuleNotFoundError: No module named 'nosuchmod'"
        );
    }

    #[test]
    fn module_names_must_be_importable() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["my-tasks.py", "1tasks.py", "wasmq.py"] {
            let path = dir.path().join(bad);
            std::fs::write(&path, "").unwrap();
            let failure = module_name(&path).unwrap_err();
            assert!(
                failure.error.to_string().contains("cannot be imported"),
                "{bad}: {:#}",
                failure.error
            );
        }
        let good = dir.path().join("tasks_v2.py");
        std::fs::write(&good, "").unwrap();
        assert_eq!(module_name(&good).unwrap(), "tasks_v2");
        assert!(module_name(&dir.path().join("tasks.txt")).is_err());
    }
}
