"""Write DVC's HTML template for ``dvc plots show`` / ``dvc plots diff`` that renders offline.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so with no network its plots are blank. This
template carries them inline instead: the bundle that ``vl-convert-python`` (a project dependency, from PyPI)
ships, which defines ``vegaEmbed`` on ``window`` as DVC's plot elements expect. It has no ``{scripts}``
placeholder, so DVC adds no CDN script tags. ``.dvc/config`` names it (``plots.html_template``, relative to
``.dvc/``); ``scripts/setup.sh`` writes it, and so does ``python scripts/plots_template.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Where .dvc/config's ``plots.html_template = offline_plots.html`` points (git-ignored: it is generated).
DEFAULT = Path(__file__).resolve().parents[1] / ".dvc" / "offline_plots.html"
#: The Vega-Lite release line of DVC's plot specs (``$schema`` ``vega-lite/v5``).
VEGA_LITE = "5.21"

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {embed}, inline (vl-convert-python {vl_convert}): no network -->
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def template() -> str:
    """The template's text: DVC's own page with the libraries inline instead of its CDN ``{scripts}``."""
    from importlib.metadata import version

    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")
    # DVC fills {refresh_tag} and {plot_divs}; the other fields are filled here, once.
    return PAGE.format(refresh_tag="{refresh_tag}", plot_divs="{plot_divs}", bundle=bundle,
                       vega=vl_convert.get_vega_version(), vega_lite=VEGA_LITE,
                       embed=vl_convert.get_vega_embed_version(), vl_convert=version("vl-convert-python"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", type=Path, default=DEFAULT, help="default: .dvc/offline_plots.html")
    args = parser.parse_args(argv)
    text = template()
    if not args.output.is_file() or args.output.read_text(encoding="utf8") != text:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(text, encoding="utf8")
        tmp.replace(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
