"""`preflab annotate`: people rank K responses in the browser, into the preference store.

A project (``project.py``) turns prompts and K candidates into tasks of the store's queue,
with an overlap share ranked by several labelers and gold items mixed in for screening.
Accounts (``accounts.py``) hold hashed tokens. The web app (``app.py``, FastAPI) serves
the labeling page and the admin page from ``static/``; submissions go through
``tasks.py`` (checked by ``validate.py``) into the same ``rankings`` table that
`preflab rm` reads with ``data.train=store:PATH``. ``stats.py`` computes the admin
page's numbers with the agreement module. ``cli.py`` is the command group.
"""
