"""The live status page: ``python -m services.web`` (``[program:web]`` under supervisord).

``app.py`` is the web process (aiohttp: the page, its WebSocket and a JSON
API), ``board.py`` what the page shows, made from the status feed, and
``static/`` the page itself: plain HTML, CSS and JavaScript, no build step.
"""
