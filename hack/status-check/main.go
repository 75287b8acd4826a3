// Command chatgate-status reads ChatService objects (JSON, as `kubectl get -o json`
// prints them) the way the status readers of GitOps tools do, so the project's tests
// can prove what Flux, Helm 4 and Argo CD will conclude from the operator's status:
//
//	chatgate-status kstatus OBJECT.json...             kstatus, as Flux and Helm 4 use it
//	chatgate-status argocd-health SCRIPT OBJECT.json... a health.lua, run as Argo CD runs it
//
// Each object gives one JSON line on standard output: {"file":..,"status":..,"message":..}.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	File    string `json:"file"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "chatgate-status: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("usage: chatgate-status kstatus OBJECT.json... | argocd-health SCRIPT OBJECT.json...")
	}
	var compute func(*unstructured.Unstructured) (result, error)
	files := args[1:]
	switch args[0] {
	case "kstatus":
		compute = func(obj *unstructured.Unstructured) (result, error) {
			r, err := status.Compute(obj)
			if err != nil {
				return result{}, err
			}
			return result{Status: r.Status.String(), Message: r.Message}, nil
		}
	case "argocd-health":
		if len(args) < 3 {
			return fmt.Errorf("argocd-health needs a script and at least one object")
		}
		script, err := os.ReadFile(args[1])
		if err != nil {
			return fmt.Errorf("reading the health script: %w", err)
		}
		files = args[2:]
		compute = func(obj *unstructured.Unstructured) (result, error) {
			return argoHealth(obj, string(script))
		}
	default:
		return fmt.Errorf("unknown command %q: use kstatus or argocd-health", args[0])
	}
	out := json.NewEncoder(os.Stdout)
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			return err
		}
		obj := &unstructured.Unstructured{}
		if err := obj.UnmarshalJSON(data); err != nil {
			return fmt.Errorf("%s: not a Kubernetes object in JSON: %w", file, err)
		}
		r, err := compute(obj)
		if err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		r.File = file
		if err := out.Encode(r); err != nil {
			return err
		}
	}
	return nil
}

// argoHealth runs a resource health script the way Argo CD's util/lua does for a
// script from argocd-cm: standard libraries skipped, then package, base, table and a
// reduced os library opened; the object as the global `obj`; a one-second budget; the
// returned table's `status` must be one of Argo CD's health codes.
func argoHealth(obj *unstructured.Unstructured, script string) (result, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, openSafeOs},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return result{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", decodeValue(l, obj.Object))
	if err := l.DoString(script); err != nil {
		return result{}, err
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return result{}, fmt.Errorf("expect table output from Lua script, not %s", l.Get(-1).Type())
	}
	r := result{Status: lua.LVAsString(table.RawGetString("status")), Message: lua.LVAsString(table.RawGetString("message"))}
	switch r.Status {
	case "Unknown", "Progressing", "Suspended", "Healthy", "Degraded", "Missing":
	default:
		// What Argo CD shows for a status it does not know.
		r = result{Status: "Unknown", Message: "Lua returned an invalid health status"}
	}
	return r, nil
}

// openSafeOs is the os library without what touches the process or the file system,
// as Argo CD offers it to health scripts (time and date only).
func openSafeOs(l *lua.LState) int {
	lua.OpenOs(l)
	os := l.GetGlobal(lua.OsLibName).(*lua.LTable)
	safe := l.NewTable()
	for _, name := range []string{"clock", "date", "difftime", "time"} {
		safe.RawSetString(name, os.RawGetString(name))
	}
	l.SetGlobal(lua.OsLibName, safe)
	l.Push(safe)
	return 1
}

// decodeValue turns a decoded JSON object into Lua values with the same rules Argo
// CD applies (numbers of every Go integer kind become Lua numbers, JSON null nil).
func decodeValue(l *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int:
		return lua.LNumber(v)
	case int32:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case json.Number:
		return lua.LString(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		arr := l.CreateTable(len(v), 0)
		for _, item := range v {
			arr.Append(decodeValue(l, item))
		}
		return arr
	case map[string]interface{}:
		tbl := l.CreateTable(0, len(v))
		for key, item := range v {
			tbl.RawSetH(lua.LString(key), decodeValue(l, item))
		}
		return tbl
	}
	return lua.LNil
}
