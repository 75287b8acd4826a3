// Command chatgate-dashlint lints Grafana dashboard JSON files.
//
// The dashboard is decoded strictly with the Grafana Foundation SDK's generated
// types (github.com/grafana/grafana-foundation-sdk/go): an unknown field, a wrong
// type, a missing required field, an unknown panel type or a Prometheus query with
// fields Grafana's schema does not have is an error. Then rules in the spirit of
// Grafana's dashboard-linter:
//
//   - template-datasource: a variable named "datasource" of type datasource for
//     Prometheus, and every panel, query and query variable uses ${datasource};
//   - panel-title-description: every panel has a title and a description;
//   - panel-units: time series, stat, gauge and bar gauge panels set a unit;
//   - target-rate-interval: every range in a query is $__rate_interval (or
//     $__range in an instant query: "over the dashboard's time range");
//   - target-variables: every $variable a query uses is defined (or Grafana's own);
//   - ids and layout: panel ids are unique, every panel has a gridPos on the 24
//     column grid, and no two panels overlap;
//   - dashboard: a uid, a title and a schemaVersion of at least 39.
//
// Usage: chatgate-dashlint DASHBOARD.json...   (exit 1 and one line per finding)
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

const datasourceRef = "${datasource}"

// Grafana's own variables, usable in every query.
var builtins = map[string]bool{
	"__rate_interval": true, "__interval": true, "__interval_ms": true, "__range": true,
	"__range_s": true, "__range_ms": true, "__from": true, "__to": true, "__dashboard": true,
	"__org": true, "__user": true, "__name": true, "__auto": true,
}

var (
	variableUse = regexp.MustCompile(`\$(?:\{([A-Za-z0-9_]+)(?::[A-Za-z]+)?\}|([A-Za-z0-9_]+))`)
	rangeUse    = regexp.MustCompile(`\[([^\]]*)\]`)
)

type finding struct {
	where, rule, msg string
}

type linter struct {
	findings []finding
	vars     map[string]bool
}

func (l *linter) add(where, rule, format string, args ...any) {
	l.findings = append(l.findings, finding{where, rule, fmt.Sprintf(format, args...)})
}

type rawPanel struct {
	ID          *int              `json:"id"`
	Type        string            `json:"type"`
	Title       string            `json:"title"`
	Description string            `json:"description"`
	Datasource  *rawRef           `json:"datasource"`
	GridPos     *rawGrid          `json:"gridPos"`
	Targets     []json.RawMessage `json:"targets"`
	FieldConfig struct {
		Defaults struct {
			Unit string `json:"unit"`
		} `json:"defaults"`
	} `json:"fieldConfig"`
	Panels []rawPanel `json:"panels"`
}

type rawRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type rawGrid struct {
	H, W, X, Y int
}

type rawTarget struct {
	RefID      string  `json:"refId"`
	Expr       string  `json:"expr"`
	Datasource *rawRef `json:"datasource"`
	Instant    bool    `json:"instant"`
}

type rawDashboard struct {
	UID           string     `json:"uid"`
	Title         string     `json:"title"`
	SchemaVersion int        `json:"schemaVersion"`
	Panels        []rawPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Definition string          `json:"definition"`
			Datasource *rawRef         `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
}

func (l *linter) lintFile(path string) {
	raw, err := os.ReadFile(path)
	if err != nil {
		l.add(path, "read", "%v", err)
		return
	}
	var typed dashboard.Dashboard
	// The SDK returns its error list as an error even when the list is empty.
	if err := typed.UnmarshalJSONStrict(raw); err != nil {
		var list cog.BuildErrors
		if !errors.As(err, &list) {
			l.add(path, "schema", "%v", err)
		}
		for _, e := range list {
			l.add(path, "schema", "%v", e)
		}
	}
	var d rawDashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		l.add(path, "json", "%v", err)
		return
	}
	if d.UID == "" || len(d.UID) > 40 {
		l.add(path, "dashboard", "uid must be set, at most 40 characters")
	}
	if d.Title == "" {
		l.add(path, "dashboard", "title must be set")
	}
	if d.SchemaVersion < 39 {
		l.add(path, "dashboard", "schemaVersion %d is old (want at least 39)", d.SchemaVersion)
	}

	l.vars = map[string]bool{}
	hasDatasource := false
	for _, v := range d.Templating.List {
		l.vars[v.Name] = true
		where := fmt.Sprintf("%s: variable %q", path, v.Name)
		switch v.Type {
		case "datasource":
			var q string
			_ = json.Unmarshal(v.Query, &q)
			if v.Name == "datasource" && q == "prometheus" {
				hasDatasource = true
			}
		case "query":
			if v.Datasource == nil || v.Datasource.UID != datasourceRef {
				l.add(where, "template-datasource", "query variables use the datasource %s", datasourceRef)
			}
			l.checkVariables(where, v.Definition)
		}
	}
	if !hasDatasource {
		l.add(path, "template-datasource", "no variable `datasource` of type datasource with query prometheus")
	}

	ids := map[int]string{}
	var boxes []struct {
		title string
		g     rawGrid
	}
	var walk func(ps []rawPanel)
	walk = func(ps []rawPanel) {
		for _, p := range ps {
			where := fmt.Sprintf("%s: panel %q", path, p.Title)
			if p.ID == nil {
				l.add(where, "ids", "panel has no id")
			} else if other, dup := ids[*p.ID]; dup {
				l.add(where, "ids", "id %d is also panel %q's", *p.ID, other)
			} else {
				ids[*p.ID] = p.Title
			}
			if p.GridPos == nil {
				l.add(where, "layout", "panel has no gridPos")
			} else {
				g := *p.GridPos
				if g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
					l.add(where, "layout", "gridPos %+v is off the 24-column grid", g)
				}
				for _, b := range boxes {
					if g.X < b.g.X+b.g.W && b.g.X < g.X+g.W && g.Y < b.g.Y+b.g.H && b.g.Y < g.Y+g.H {
						l.add(where, "layout", "overlaps panel %q", b.title)
					}
				}
				boxes = append(boxes, struct {
					title string
					g     rawGrid
				}{p.Title, g})
			}
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			if _, known := cog.ConfigForPanelcfgVariant(p.Type); !known {
				l.add(where, "schema", "unknown panel type %q", p.Type)
			}
			if p.Title == "" || p.Description == "" {
				l.add(where, "panel-title-description", "panel needs a title and a description")
			}
			switch p.Type {
			case "timeseries", "stat", "gauge", "bargauge":
				if p.FieldConfig.Defaults.Unit == "" {
					l.add(where, "panel-units", "set fieldConfig.defaults.unit")
				}
			}
			if p.Type == "text" {
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != datasourceRef || p.Datasource.Type != "prometheus" {
				l.add(where, "template-datasource", "panel datasource must be {type: prometheus, uid: %s}", datasourceRef)
			}
			if len(p.Targets) == 0 {
				l.add(where, "targets", "panel has no query")
			}
			refs := map[string]bool{}
			for i, rt := range p.Targets {
				var t rawTarget
				if err := json.Unmarshal(rt, &t); err != nil {
					l.add(where, "targets", "query %d: %v", i, err)
					continue
				}
				tw := fmt.Sprintf("%s query %s", where, t.RefID)
				if t.RefID == "" || refs[t.RefID] {
					l.add(tw, "targets", "refId missing or repeated")
				}
				refs[t.RefID] = true
				if t.Datasource == nil || t.Datasource.UID != datasourceRef {
					l.add(tw, "template-datasource", "query datasource must be %s", datasourceRef)
				}
				if strings.TrimSpace(t.Expr) == "" {
					l.add(tw, "targets", "empty expr")
				}
				for _, m := range rangeUse.FindAllStringSubmatch(t.Expr, -1) {
					if m[1] != "$__rate_interval" && !(t.Instant && m[1] == "$__range") {
						l.add(tw, "target-rate-interval", "range [%s] should be [$__rate_interval] ([$__range] in an instant query)", m[1])
					}
				}
				l.checkVariables(tw, t.Expr)
			}
		}
	}
	walk(d.Panels)
}

func (l *linter) checkVariables(where, text string) {
	for _, m := range variableUse.FindAllStringSubmatch(text, -1) {
		name := m[1] + m[2]
		if !builtins[name] && !l.vars[name] {
			l.add(where, "target-variables", "$%s is not a variable of this dashboard", name)
		}
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: chatgate-dashlint DASHBOARD.json...")
		os.Exit(2)
	}
	plugins.RegisterDefaultPlugins()
	l := &linter{}
	for _, path := range os.Args[1:] {
		l.lintFile(path)
	}
	sort.SliceStable(l.findings, func(i, j int) bool { return l.findings[i].where < l.findings[j].where })
	for _, f := range l.findings {
		fmt.Printf("%s: [%s] %s\n", f.where, f.rule, f.msg)
	}
	if len(l.findings) > 0 {
		fmt.Fprintf(os.Stderr, "chatgate-dashlint: %d finding(s)\n", len(l.findings))
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "chatgate-dashlint: %d dashboard(s), no findings\n", len(os.Args)-1)
}
