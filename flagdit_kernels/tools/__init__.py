"""Developer tools that run without a GPU (``python -m flagdit_kernels.tools.<name>``)."""
