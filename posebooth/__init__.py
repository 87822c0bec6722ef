"""posebooth: teach a diffusion model a subject from a few photos, then pose it (library package)."""

__version__ = "0.1.0"
