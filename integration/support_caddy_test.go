package integration

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	_ "github.com/ssefeed/caddy-ssefeed"
)

// The tests run Caddy in this process through caddytest, on its fixed admin
// port 2999, HTTP port 9080 and HTTPS port 9443, so they must not run in
// parallel, and every test that starts Caddy lives in this package. The
// real binary runs on ports of its own.
const (
	adminURL = "http://localhost:2999"
	siteURL  = "http://localhost:9080"
	tlsURL   = "https://localhost:9443"
)

// option changes the Caddyfile that startCaddy loads.
type option func(*caddyOptions)

type caddyOptions struct {
	globals []string
	tls     bool
}

// withGlobal adds lines to the global options, such as metrics or a
// servers block.
func withGlobal(lines string) option {
	return func(o *caddyOptions) { o.globals = append(o.globals, lines) }
}

// withTLS serves the site on tlsURL too, with a certificate from Caddy's
// internal CA, and leaves HTTP unredirected.
func withTLS() option {
	return func(o *caddyOptions) { o.tls = true }
}

// caddyfile returns a whole Caddyfile: the test ports and the options'
// globals, and site on siteURL (and tlsURL with withTLS).
func caddyfile(site string, options ...option) string {
	o := applyOptions(options)
	if o.tls {
		o.globals = append(o.globals, "auto_https disable_redirects")
	}
	config := fmt.Sprintf(`{
	admin localhost:2999
	http_port 9080
	https_port 9443
	grace_period 1s
	skip_install_trust
%s
}
%s {
%s
}
`, strings.Join(o.globals, "\n"), siteURL, site)
	if o.tls {
		config += tlsURL + " {\n\ttls internal\n" + site + "\n}\n"
	}
	return config
}

func applyOptions(options []option) caddyOptions {
	var o caddyOptions
	for _, apply := range options {
		apply(&o)
	}
	return o
}

// caddyServer is the in-process Caddy of a test.
type caddyServer struct {
	tester  *caddytest.Tester
	options []option
}

// startCaddy loads the Caddyfile of site and options into the in-process
// Caddy, in place of whatever config it ran. With withTLS, it waits until
// the certificate is served.
func startCaddy(t *testing.T, site string, options ...option) *caddyServer {
	t.Helper()
	c := &caddyServer{tester: caddytest.NewTester(t), options: options}
	c.reload(site)
	if applyOptions(options).tls {
		waitForCertificate(t)
	}
	return c
}

// reload loads site with the options of startCaddy, as `caddy reload` does;
// a failure marks the test failed.
func (c *caddyServer) reload(site string) {
	c.tester.InitServer(caddyfile(site, c.options...), "caddyfile")
}

// waitForCertificate waits until Caddy serves a certificate on 9443: tls
// internal issues it in the background after the config loads.
func waitForCertificate(t *testing.T) {
	t.Helper()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		conn, err := tls.Dial("tcp", "localhost:9443", &tls.Config{InsecureSkipVerify: true})
		require.NoError(c, err, "TLS handshake on 9443")
		conn.Close()
	}, 10*time.Second, 50*time.Millisecond)
}

// tailFeed is a site body with a tail feed of rawURL on /events that maps
// /id and /body, plus options, one a line.
func tailFeed(rawURL string, options ...string) string {
	return "sse_feed /events {\n\ttail " + rawURL + "\n\tid /id\n\tdata /body\n\t" + strings.Join(options, "\n\t") + "\n}"
}

// The real binary, built once for the tests that run it.
var build struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// caddyBinary builds cmd/caddy, once for the run of the package, and returns
// the path of the binary.
func caddyBinary(t *testing.T) string {
	t.Helper()
	build.once.Do(func() {
		if build.dir, build.err = os.MkdirTemp("", "ssefeed-integration-"); build.err != nil {
			return
		}
		build.bin = filepath.Join(build.dir, "caddy-ssefeed")
		out, err := exec.Command("go", "build", "-o", build.bin, "github.com/ssefeed/caddy-ssefeed/cmd/caddy").CombinedOutput()
		if err != nil {
			build.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	require.NoError(t, build.err)
	return build.bin
}

// removeBuilds removes what caddyBinary built.
func removeBuilds() {
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
}

// process is a command running in the background.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has exited
	err    error         // how it exited; read after exited is closed
	output bytes.Buffer  // its stdout and stderr; read after exited is closed
	proc   *os.Process   // the process, to signal it
}

// startProcess runs bin with args, its home and XDG directories set to a
// directory of its own. The process is killed when the test ends, if it
// still runs.
func startProcess(t *testing.T, bin string, args ...string) *process {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command(bin, args...)
	p := &process{cmd: cmd, exited: make(chan struct{})}
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir)
	cmd.Stdout, cmd.Stderr = &p.output, &p.output
	require.NoError(t, cmd.Start())
	p.proc = cmd.Process
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.exited
	})
	return p
}

// runCaddyfile runs the real binary on the Caddyfile file and waits until
// rawURL answers.
func runCaddyfile(t *testing.T, file, rawURL string) *process {
	t.Helper()
	p := startProcess(t, caddyBinary(t), "run", "--config", file)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		select {
		case <-p.exited:
			c.Errorf("caddy exited before serving: %v\n%s", p.err, p.output.String())
			return
		default:
		}
		resp, err := http.Get(rawURL)
		require.NoError(c, err)
		resp.Body.Close()
	}, 10*time.Second, 50*time.Millisecond, "%s not serving", rawURL)
	return p
}

// expectExit waits for the process to exit cleanly.
func (p *process) expectExit(t *testing.T, within time.Duration, why string) {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(within):
		t.Fatalf("caddy still running %v after stop, %s", within, why)
	}
	if p.err != nil {
		t.Errorf("caddy exited with %v\n%s", p.err, p.output.String())
	}
}

// signal sends sig to the process.
func (p *process) signal(t *testing.T, sig os.Signal) {
	t.Helper()
	require.NoError(t, p.cmd.Process.Signal(sig))
}

// freePort returns a port of 127.0.0.1 that was free a moment ago, for a
// process that must not meet the fixed ports of caddytest nor another
// process.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// binaryCaddy is the real binary serving a site on ports of its own, with
// Caddy's default grace period, which waits for open connections forever.
type binaryCaddy struct {
	*process
	file  string // its Caddyfile
	admin string // the admin endpoint's address
	port  int    // the site's port
	// globals are global options beside the ports'.
	globals string
	// URL is the site's.
	URL string
}

// startBinary runs the real binary with site on free ports, and the given
// global options, if any.
func startBinary(t *testing.T, site string, globals ...string) *binaryCaddy {
	t.Helper()
	port := freePort(t)
	c := &binaryCaddy{
		file:    filepath.Join(t.TempDir(), "Caddyfile"),
		admin:   fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		port:    port,
		globals: strings.Join(globals, "\n"),
		URL:     fmt.Sprintf("http://127.0.0.1:%d", port),
	}
	c.write(t, site)
	c.process = runCaddyfile(t, c.file, c.URL+"/")
	return c
}

// write writes the Caddyfile of site.
func (c *binaryCaddy) write(t *testing.T, site string) {
	t.Helper()
	config := fmt.Sprintf(`{
	admin %s
	auto_https off
	persist_config off
	skip_install_trust
%s
}
%s {
%s
}
`, c.admin, c.globals, c.URL, site)
	require.NoError(t, os.WriteFile(c.file, []byte(config), 0o600))
}

// reload loads site with `caddy reload`, which returns once the new config
// runs.
func (c *binaryCaddy) reload(t *testing.T, site string) {
	t.Helper()
	c.write(t, site)
	out, err := exec.Command(caddyBinary(t), "reload", "--config", c.file, "--address", c.admin).CombinedOutput()
	require.NoError(t, err, "caddy reload: %s", out)
}

// stop runs `caddy stop` in the background: it returns when the process
// has stopped, which is what the test waits for.
func (c *binaryCaddy) stop(t *testing.T) {
	t.Helper()
	startProcess(t, caddyBinary(t), "stop", "--address", c.admin)
}
