"""Development tools, not deployed (`.funcignore` keeps this folder out of the Functions package): a local
SendGrid-compatible server for demos, tests, benchmarks and fault injection (`server`), and reproducible Customer
Insights exports of any size (`samplegen`). They import the product's constants from `shared`; `shared` never imports
them, except the command line's `demo` and `sandbox` commands, lazily, from a checkout."""
