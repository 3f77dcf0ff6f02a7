"""``ldm serve``: an HTTP server with AUTOMATIC1111's API and ldm's own job API (docs/server.md).

    config.py     ServerConfig, Limits: the flags, checked (the bind and auth rule among them)
    app.py        create_app(config) -> FastAPI; serve(config)
    a1111.py      /sdapi/v1/... routes          native.py   /ldm/v1/jobs routes, server-sent events
    schema.py     the typed request and response models (A1111's modules/api/models.py)
    translate.py  request JSON -> GenerationSettings; results -> A1111's JSON
    names.py      A1111's sampler and schedule-type names
    jobs.py       the bounded FIFO queue and its one worker thread
    engine.py     the loaded model; how a job runs, stops and saves
    catalog.py    models and LoRAs offered by name (no path from a client is ever opened)
    guard.py      HTTP Basic auth and the body-size limit, before any route
    service.py    Server: the parts of one server

FastAPI and uvicorn come with the ``serve`` extra (``pip install 'ldm[serve]'``); nothing here is
imported by the rest of ldm.
"""
