"""Make the plain `lm_eval` command know the `plural` model type.

lm-eval 0.4 fills its model registry from its own table only (no plug-in entry points), so a
type defined in another package is invisible to `lm_eval --model ...`. This module is imported
at interpreter start by a one-line `plural-lm-eval.pth` in site-packages (written by
`make install`, or by `python -m plural.evaluate.lm_eval_hook install`). It costs nothing until
lm-eval's `lm_eval.models` module is imported; right after that module has registered lm-eval's
own types, `plural` is added as a lazy placeholder (`plural.evaluate.lm_eval_model:PluralLM`), so
neither torch nor plural's model code is imported unless `--model plural` is asked for.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

TARGET = "plural.evaluate.lm_eval_model:PluralLM"
PTH_NAME = "plural-lm-eval.pth"
# One line: .pth files execute lines that start with "import". Silent if plural is uninstalled.
PTH_LINE = ("import importlib.util as _u; _u.find_spec('plural') is not None and "
            "__import__('plural.evaluate.lm_eval_hook')\n")


def register() -> None:
    from lm_eval.api.registry import model_registry

    if "plural" not in model_registry:
        model_registry.register("plural", target=TARGET)


class _AfterLmEvalModels(importlib.abc.MetaPathFinder):
    """Wraps the loader of `lm_eval.models` so that `register()` runs right after it executes."""

    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                try:
                    register()
                except Exception:  # never break lm-eval itself
                    pass

        spec.loader = Loader()
        return spec


def install_finder() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLmEvalModels())


def install_pth(site_packages: Path | None = None) -> Path:
    """Write the .pth line into site-packages (the current interpreter's purelib by default)."""
    import sysconfig

    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    tmp = target.with_suffix(".tmp")
    tmp.write_text(PTH_LINE, encoding="utf-8")
    tmp.replace(target)
    return target


install_finder()

if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m plural.evaluate.lm_eval_hook install")
    print(f"wrote {install_pth()}: `lm_eval --model plural` now works in this environment")
