"""The commands for app bundles: `package`, `verify`."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--target", required=True, type=click.Choice(["ios", "android"]),
              help="android: the mobile ONNX artifact; ios: the Core ML package (plus --with-onnx, --with-coreai).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--with-onnx", is_flag=True, help="ios: also the mobile ONNX artifact, for onnxruntime-genai's Objective-C API.")
@click.option("--with-coreai", is_flag=True, help="ios: also the Core AI asset (iOS/macOS 27), beside Core ML for older systems.")
@click.option("--validate", "validate_json", type=click.Path(path_type=Path), help="A `validate --json` result: its figures go in the manifest.")
@click.option("--zip", "make_zip", is_flag=True, help="Also write BUNDLE.zip (deterministic).")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
def package(path, target, out, with_onnx, with_coreai, validate_json, make_zip, force):
    """Make a drop-in app bundle from a quantize OUT folder (or one artifact folder in it).

    \b
    The bundle holds the artifact folders as they are, plus BUNDLE/manifest.json: every file
    with size and sha256, runtime and minimum OS, model facts (recipe, max_length, bits per
    weight, KV-cache bytes), store size limits. Source files are checked against the quantize
    manifest first. Check a copied bundle with `phi3-export verify BUNDLE`.

    \b
    Examples:
      phi3-export package out/ --target android --out bundle/ --validate result.json
      phi3-export package out/ --target ios --with-onnx --zip --out ios-bundle/
      phi3-export package out/ --target ios --with-coreai --out ios-bundle/
    """
    from phi3_export.package import package as run

    manifest, warnings = run(path, target, out, with_onnx=with_onnx, with_coreai=with_coreai, validate_json=validate_json,
                             make_zip=make_zip, force=force)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{out}: {target} bundle, {len(manifest['files'])} files, {manifest['size_bytes'] / 1e6:.1f} MB"
               + (f" (+ {out}.zip)" if make_zip else ""))


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def verify(bundle):
    """Check a bundle before shipping: every file against its manifest, then load it.

    Names each missing, truncated, altered or Git LFS pointer file; opens the ONNX model with
    onnxruntime-genai from the bundle path and reloads the Core ML package. Exit 0 only when
    everything holds, 1 otherwise.

    \b
    Example (an app's CI, after copying the bundle into the app):
      phi3-export verify app/src/main/assets/phi3
    """
    from phi3_export.package import verify_bundle

    result = verify_bundle(bundle)
    for line in result.checks:
        click.echo(f"ok: {line}")
    for line in result.problems:
        click.echo(f"problem: {line}", err=True)
    if not result.ok:
        click.echo(f"{bundle}: {len(result.problems)} problem(s): do not ship", err=True)
        sys.exit(1)
    click.echo(f"{bundle}: verified")
