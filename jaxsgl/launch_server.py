"""`python -m jaxsgl.launch_server`, the entry point SGLang users type.

The HTTP server lives in the `serving` package, which builds on `jaxsgl`; running it by module
name keeps the import direction one way (serving -> jaxsgl).
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("serving.launch_server", run_name="__main__", alter_sys=True)
