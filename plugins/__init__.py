"""
jwtlet's plugin package, ``jwtlet.plugins``: every module here (and in the
same package path of other installed distributions, and in the config's
``plugin_dirs``) is searched by ``twisted.plugin.getPlugins`` for validator,
store and signer factories.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
