"The documentation site's tooling: `python -m docs` builds it (docs/build.py), `python -m docs.browser` looks at it."
