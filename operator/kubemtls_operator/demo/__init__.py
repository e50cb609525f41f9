"""``kubemtls demo``: the whole system on one machine, from nothing.

An emulated API server with admission, the real operator, pods created through the API and
run from their webhook-patched specs (network namespaces when root), and a mock EHR that
speaks FHIR R4 over mutual TLS. ``script.run()`` is the entry point; ``scenes`` holds what
is shown and checked; ``stage`` brings the parts up and tears them down.
"""
