"""pushd's HTTP side: one Site serving the producer API, the subscribers'
transports and the demo page.

  site.py      the Site and its resources put together (`make_site`)
  channel.py   the HTTP connection and request: strictness, errors, graceful stop
  hotpath.py   the producers' publishes answered without twisted.web
  producer.py  the producer API on /channels; batch.py /publish and /push;
  control.py   /users and node commands; ops.py /health and /metrics
  static.py    `/` and the files in pushd/static
  resource.py, errors.py   what the API resources share

The subscribers' transports (/ws, /sse, /stream) are in pushd.transports.
Nothing is re-exported here: the transports import pushd.web.errors, and the
site imports the transports, so this package's import stays free of both.
"""
