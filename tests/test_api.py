"""The public names stay functions even after their same-named submodules are imported."""
import subprocess
import sys



def test_function_names_survive_submodule_imports():
    import attn2conv.capture  # noqa: F401  (each import would rebind the package attribute to the module)
    import attn2conv.check.cli  # noqa: F401
    import attn2conv.convert  # noqa: F401
    import attn2conv.distill  # noqa: F401
    from attn2conv.convert import ConversionResult

    for name in ("capture", "convert", "distill", "check"):
        assert callable(getattr(attn2conv, name)) and type(getattr(attn2conv, name)).__name__ == "function", name
    assert ConversionResult.__name__ == "ConversionResult"


def test_checker_import_does_not_import_torch():
    code = "import attn2conv, attn2conv.check.cli, sys; attn2conv.check; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
