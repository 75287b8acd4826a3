//go:build tools

// The commands hack/prom-tools.sh builds from this module besides chatgate-dashlint,
// pinned here so go.mod and go.sum hold their versions.
package main

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
