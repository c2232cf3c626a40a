# Voilà's settings for the O-Lab single-user server. Voilà's server extension reads them
# from this file (voila.py in a Jupyter config folder), not from the server's own config.
c = get_config()  # noqa: F821

# Every lab and the lab index render with O-Lab's template
# (/opt/olab/share/jupyter/voila/templates/olab).
c.VoilaConfiguration.template = "olab"
# A page is rendered with that template only: a ?template= in a link someone sends cannot
# render the student's server's pages with another one.
c.VoilaConfiguration.allow_template_override = "NO"
