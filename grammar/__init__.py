"""The Lark grammar of maddy's configuration language (package data: maddy.lark)."""
