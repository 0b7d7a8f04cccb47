"""Exporters: the OIS model split into an image+depth encoder graph and a click decoder graph."""
