"""Reports: HTML pages with plots and pictures of boxes."""
