# The O-Lab single-user server's settings, in the environment's own config folder
# (/opt/olab/etc/jupyter in the image): what a student's server serves, for every student.
c = get_config()  # noqa: F821

# MathJax from the server, not from a CDN. Voilà 0.5's page config falls back to
# MathJax from cdnjs.cloudflare.com when the server's settings name no
# mathjax_url (voila.utils.get_page_config; a jupyter_server's settings never do), and
# its front end then loads that script instead of the MathJax 3 its own bundle
# carries: with no internet every formula stayed raw text. Set to None, the front end
# typesets with the bundled one.
# A plain dict: jupyterhub-singleuser reads this setting as one (a merged .update() value
# made it fail to start).
c.ServerApp.tornado_settings = {"mathjax_url": None, "mathjax_config": None}

# JupyterLab asks the internet for nothing: no news feed, no update check (the
# students' settings cannot turn them back on; share/jupyter/lab/settings/overrides.json
# keeps the question from being asked).
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
